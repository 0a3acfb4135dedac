# Sourced by the fleet benches (bench/fleet_bench.sh, bench/rollout_bench.sh) after they set
# BENCH (their results folder): a fresh run folder, the release tandem-fleet, free loopback ports,
# and every process they start stopped on exit (add its pid to PIDS).
mkdir -p "$BENCH"
rm -rf "${BENCH:?}"/run
RUN="$BENCH/run"
mkdir -p "$RUN"

FLEET=./target/release/tandem-fleet
# scripts/bench.sh builds the release binaries first and says so (BENCH_BUILT=1); run alone, or
# when that build did not include tandem-fleet, this builds it.
if [ -z "${BENCH_BUILT:-}" ] || [ ! -x "$FLEET" ]; then
    cargo build --release -p tandem-fleet
fi

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
PIDS=()
cleanup() { for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done; }
trap cleanup EXIT

MQTT_PORT=$(free_port)
API_PORT=$(free_port)
