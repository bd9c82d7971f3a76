#!/usr/bin/env bash
# `make edge-demo`: a cloud sink, an edge relay and simulated devices together on loopback,
# with the relay's status line every 2 seconds. Ctrl-C (or the end of the simulation) stops
# everything this script started, by PID.
set -euo pipefail
BIN=${1:-.venv/bin}
SECONDS_TO_RUN=${EDGE_DEMO_SECONDS:-30}
DIR=${EDGE_DEMO_DIR:-$(mktemp -d /tmp/sockstack-edge-demo.XXXXXX)}
SINK=${EDGE_DEMO_SINK_PORT:-5080}
UDP=${EDGE_DEMO_UDP_PORT:-5081}
TCP=${EDGE_DEMO_TCP_PORT:-5082}
pids=()
stop() { for pid in "${pids[@]}"; do kill -INT "$pid" 2>/dev/null || true; done; wait; }
trap stop EXIT
echo "edge demo: stores in $DIR"
"$BIN/sockstack" --log-level WARNING serve --tcp "127.0.0.1:$SINK" --sink "$DIR/cloud.db" &
pids+=($!)
"$BIN/sockstack" --log-level WARNING edge --store "$DIR/edge.db" \
    --listen "udp://127.0.0.1:$UDP" --listen "tcp://127.0.0.1:$TCP" \
    --pipeline examples/edge_pipeline.py:build --upstream "tcp://127.0.0.1:$SINK" \
    --status-every 2 &
pids+=($!)
"$BIN/sockstack" simulate --to "udp://127.0.0.1:$UDP" --devices 50 --rate 20 \
    --duration "$SECONDS_TO_RUN"
"$BIN/sockstack" edge status "$DIR/edge.db"
echo "the cloud's view:"
"$BIN/sockstack" call "tcp://127.0.0.1:$SINK" edge.stats
