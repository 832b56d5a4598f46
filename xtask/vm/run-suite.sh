# The privileged suite, run as root inside a guest (or on the host for `--kernel host`).
# `cargo xtask vm-test` puts in front of this: the assignments of WARD_BIN, WARD_BIN_ABI_NEXT,
# WARD_CONTROL_BIN, WARD_TEST_PEER, XTASK_BIN, TEST_EXES (space separated), TEST_THREADS,
# WARD_TEST_TIME_SCALE and RESULTS, and `set -- <libtest filter>`.
echo "vm-test: kernel $(uname -r)"
uname -r > "$RESULTS/kernel-release"
export WARD_BIN WARD_BIN_ABI_NEXT WARD_CONTROL_BIN WARD_TEST_PEER WARD_TEST_TIME_SCALE RUST_BACKTRACE=1
status=0
for exe in $TEST_EXES; do
    echo "vm-test: running ${exe##*/}"
    started=$(date +%s)
    "$exe" --test-threads="$TEST_THREADS" "$@" </dev/null
    rc=$?
    echo "vm-test: ${exe##*/} took $(( $(date +%s) - started )) s"
    if [ "$rc" -ne 0 ]; then
        echo "vm-test: ${exe##*/} exited with $rc"
        status=1
    fi
done
echo "vm-test: verifier record"
"$XTASK_BIN" vm-test --verifier-record "$RESULTS/verifier.txt" || status=1
exit $status
