//! DNS messages as the proxy reads them (hickory-proto parses them): a workload's question, and
//! what an answer teaches: the addresses of the asked name, through its CNAME chain. Records of
//! names the question did not lead to are never taken.
use std::net::IpAddr;

use hickory_proto::{
    op::{Message, MessageType, OpCode, Query as Question, ResponseCode},
    rr::{Name, RData, RecordType},
};

/// The longest CNAME chain followed.
const MAX_CHAIN: usize = 16;
/// The most addresses taken from one answer.
pub const MAX_ADDRESSES: usize = 256;

/// A workload's question, as forwarded.
#[derive(Clone, Debug)]
pub struct Query {
    pub id: u16,
    /// Normalized (lowercase, no final dot).
    pub name: String,
    question: Question,
}

/// What an answer gives: the names from the asked one through its CNAME chain (the asked one
/// first), and the addresses of the last, each with its TTL in seconds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Answer {
    pub chain: Vec<String>,
    pub addresses: Vec<(IpAddr, u32)>,
}

/// A name as policy compares names: lowercase ASCII (IDNA names in their `xn--` form), without
/// the final dot.
pub fn normalized(name: &Name) -> String {
    let text = name.to_ascii().to_ascii_lowercase();
    match text.strip_suffix('.') {
        Some(stripped) => stripped.to_owned(),
        None => text,
    }
}

/// A workload's query: one question, a standard query. `Err` says what is wrong.
pub fn parse_query(bytes: &[u8]) -> Result<Query, String> {
    let message = Message::from_vec(bytes).map_err(|e| format!("malformed query: {e}"))?;
    if message.metadata.message_type != MessageType::Query {
        return Err("a response sent as a query".into());
    }
    if message.metadata.op_code != OpCode::Query {
        return Err(format!(
            "opcode {:?} is not a query",
            message.metadata.op_code
        ));
    }
    let [question] = message.queries.as_slice() else {
        return Err(format!(
            "{} questions (a query asks one)",
            message.queries.len()
        ));
    };
    Ok(Query {
        id: message.metadata.id,
        name: normalized(question.name()),
        question: question.clone(),
    })
}

/// The resolver's answer to `query`: `Ok(None)` when it is not the answer to this query (another
/// id or question: the proxy waits on), `Err` when it cannot be read.
pub fn parse_answer(query: &Query, bytes: &[u8]) -> Result<Option<Answer>, String> {
    let message = Message::from_vec(bytes).map_err(|e| format!("malformed answer: {e}"))?;
    if message.metadata.id != query.id
        || message.metadata.message_type != MessageType::Response
        || message.queries.len() != 1
        || normalized(message.queries[0].name()) != query.name
        || message.queries[0].query_type() != query.question.query_type()
    {
        return Ok(None);
    }
    let mut answer = Answer {
        chain: vec![query.name.clone()],
        addresses: Vec::new(),
    };
    if message.metadata.response_code != ResponseCode::NoError {
        return Ok(Some(answer));
    }
    // The chain: each CNAME whose owner is the chain's last name, in any order in the section.
    while answer.chain.len() <= MAX_CHAIN {
        let last = answer.chain.last().expect("never empty");
        let next = message.answers.iter().find_map(|r| match &r.data {
            RData::CNAME(target) if normalized(&r.name) == *last => Some(normalized(&target.0)),
            _ => None,
        });
        match next {
            Some(next) if !answer.chain.contains(&next) => answer.chain.push(next),
            _ => break,
        }
    }
    for record in &message.answers {
        if answer.addresses.len() >= MAX_ADDRESSES {
            break;
        }
        let address = match &record.data {
            RData::A(a) => IpAddr::V4(a.0),
            RData::AAAA(a) => IpAddr::V6(a.0),
            _ => continue,
        };
        // An address of a name the question did not lead to is not taken.
        if answer.chain.contains(&normalized(&record.name)) {
            answer.addresses.push((address, record.ttl));
        }
    }
    Ok(Some(answer))
}

/// An answer to `query` with no records and `code`: what the proxy says when it cannot or may not
/// answer (`REFUSED`, `SERVFAIL`).
pub fn error_answer(query: &Query, code: ResponseCode) -> Vec<u8> {
    let mut message = Message::error_msg(query.id, OpCode::Query, code);
    message.metadata.recursion_desired = true;
    message.metadata.recursion_available = true;
    message.add_query(query.question.clone());
    message.to_vec().unwrap_or_default()
}

/// `FORMERR` for a query that could not be read, when its id can be (its first two bytes).
pub fn format_error(bytes: &[u8]) -> Option<Vec<u8>> {
    let id = u16::from_be_bytes([*bytes.first()?, *bytes.get(1)?]);
    Message::error_msg(id, OpCode::Query, ResponseCode::FormErr)
        .to_vec()
        .ok()
}

/// Whether a record type asks for addresses (only such answers teach anything).
pub fn asks_addresses(query: &Query) -> bool {
    matches!(
        query.question.query_type(),
        RecordType::A | RecordType::AAAA | RecordType::ANY
    )
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};
    use std::str::FromStr as _;

    use hickory_proto::rr::{
        rdata::{A, AAAA, CNAME},
        Record,
    };

    use super::*;

    fn query(name: &str, kind: RecordType) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.id = 7;
        m.add_query(Question::query(Name::from_str(name).unwrap(), kind));
        m.to_vec().unwrap()
    }

    fn answer(id: u16, name: &str, kind: RecordType, records: Vec<Record>) -> Vec<u8> {
        let mut m = Message::response(id, OpCode::Query);
        m.add_query(Question::query(Name::from_str(name).unwrap(), kind));
        for r in records {
            m.add_answer(r);
        }
        m.to_vec().unwrap()
    }

    fn a(name: &str, ttl: u32, addr: [u8; 4]) -> Record {
        Record::from_rdata(
            Name::from_str(name).unwrap(),
            ttl,
            RData::A(A(Ipv4Addr::from(addr))),
        )
    }

    fn cname(name: &str, target: &str) -> Record {
        Record::from_rdata(
            Name::from_str(name).unwrap(),
            30,
            RData::CNAME(CNAME(Name::from_str(target).unwrap())),
        )
    }

    #[test]
    fn a_question_is_read_and_its_name_normalized() {
        let q = parse_query(&query("API.Payments.Example.", RecordType::A)).unwrap();
        assert_eq!((q.id, q.name.as_str()), (7, "api.payments.example"));
        assert!(asks_addresses(&q));
        assert!(parse_query(&[1, 2, 3]).unwrap_err().contains("malformed"));
        assert!(parse_query(&answer(7, "a.example.", RecordType::A, vec![]))
            .unwrap_err()
            .contains("response"));
        assert_eq!(
            format_error(&[0x12, 0x34, 0xff]).map(|m| m[..2].to_vec()),
            Some(vec![0x12, 0x34])
        );
        assert_eq!(format_error(&[1]), None);
    }

    #[test]
    fn the_chain_is_followed_and_records_of_other_names_are_left_out() {
        let q = parse_query(&query("www.example.com.", RecordType::A)).unwrap();
        let bytes = answer(
            7,
            "www.example.com.",
            RecordType::A,
            vec![
                // Out of order, with a record of a name nobody asked for.
                a("edge.cdn.example.", 5, [192, 0, 2, 7]),
                cname("www.example.com.", "edge.cdn.example."),
                a("evil.example.", 3600, [203, 0, 113, 9]),
                a("edge.cdn.example.", 0, [192, 0, 2, 8]),
            ],
        );
        let got = parse_answer(&q, &bytes).unwrap().unwrap();
        assert_eq!(got.chain, ["www.example.com", "edge.cdn.example"]);
        assert_eq!(
            got.addresses,
            [
                (IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7)), 5),
                (IpAddr::V4(Ipv4Addr::new(192, 0, 2, 8)), 0)
            ]
        );
    }

    #[test]
    fn answers_to_other_questions_are_not_this_ones() {
        let q = parse_query(&query("a.example.", RecordType::AAAA)).unwrap();
        let aaaa = Record::from_rdata(
            Name::from_str("a.example.").unwrap(),
            60,
            RData::AAAA(AAAA(Ipv6Addr::LOCALHOST)),
        );
        assert_eq!(
            parse_answer(
                &q,
                &answer(8, "a.example.", RecordType::AAAA, vec![aaaa.clone()])
            )
            .unwrap(),
            None
        );
        assert_eq!(
            parse_answer(
                &q,
                &answer(7, "b.example.", RecordType::AAAA, vec![aaaa.clone()])
            )
            .unwrap(),
            None
        );
        assert_eq!(
            parse_answer(
                &q,
                &answer(7, "a.example.", RecordType::A, vec![aaaa.clone()])
            )
            .unwrap(),
            None
        );
        let got = parse_answer(&q, &answer(7, "A.EXAMPLE.", RecordType::AAAA, vec![aaaa]))
            .unwrap()
            .unwrap();
        assert_eq!(got.addresses, [(IpAddr::V6(Ipv6Addr::LOCALHOST), 60)]);
        assert!(parse_answer(&q, &[0; 5]).is_err());
    }

    #[test]
    fn a_cname_loop_and_a_flood_of_records_are_bounded() {
        let q = parse_query(&query("a.example.", RecordType::A)).unwrap();
        let mut records = vec![
            cname("a.example.", "b.example."),
            cname("b.example.", "a.example."),
        ];
        records.extend((0..1000u32).map(|i| a("a.example.", 60, (0x0a00_0000 + i).to_be_bytes())));
        let got = parse_answer(&q, &answer(7, "a.example.", RecordType::A, records))
            .unwrap()
            .unwrap();
        assert_eq!(got.chain, ["a.example", "b.example"]);
        assert_eq!(got.addresses.len(), MAX_ADDRESSES);
        let refused = error_answer(&q, ResponseCode::Refused);
        let m = Message::from_vec(&refused).unwrap();
        assert_eq!(
            (m.metadata.id, m.metadata.response_code),
            (7, ResponseCode::Refused)
        );
        assert_eq!(parse_answer(&q, &refused).unwrap().unwrap().addresses, []);
    }
}
