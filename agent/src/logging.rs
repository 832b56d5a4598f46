//! Logging setup, with a level that `ward log-level` can change while the agent runs.
use std::sync::OnceLock;

use tracing_subscriber::{
    layer::SubscriberExt as _, reload, util::SubscriberInitExt as _, EnvFilter, Layer as _,
};

type Reload = Box<dyn Fn(EnvFilter) -> Result<(), String> + Send + Sync>;
static RELOAD: OnceLock<Reload> = OnceLock::new();

fn filter(level: &str) -> Result<EnvFilter, String> {
    EnvFilter::try_new(level).map_err(|e| format!("log level {level:?}: {e}"))
}

pub fn init(json: bool, level: &str) -> Result<(), String> {
    let (filter_layer, handle) = reload::Layer::new(filter(level)?);
    // Colours only for a person at a terminal; files and pipes get plain `key=value` text.
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let fmt = if json {
        fmt.json()
            .flatten_event(true)
            .with_current_span(false)
            .boxed()
    } else {
        fmt.boxed()
    };
    tracing_subscriber::registry()
        .with(filter_layer)
        .with(fmt)
        .try_init()
        .map_err(|e| e.to_string())?;
    let _ = RELOAD.set(Box::new(move |f| {
        handle.reload(f).map_err(|e| e.to_string())
    }));
    Ok(())
}

pub fn set_level(level: &str) -> Result<(), String> {
    let reload = RELOAD.get().ok_or("logging is not initialised")?;
    reload(filter(level)?)?;
    tracing::info!(level, "log level changed");
    Ok(())
}
