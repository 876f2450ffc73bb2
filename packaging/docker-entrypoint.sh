#!/bin/sh
# Makes the node's home on the first start, then runs neurod with the
# container's arguments. `run` listens on every interface (the container's
# own) and serves the dashboard on :8080 unless the arguments say otherwise.
set -eu
home="${NEURO_HOME:-/var/lib/neuro}"
if [ ! -f "$home/config.toml" ]; then
  neurod init --home "$home"
fi
if [ "${1:-}" = "run" ]; then
  shift
  case " $* " in
    *" --http "*|*" --http="*) ;;
    *) set -- --http 0.0.0.0:8080 "$@" ;;
  esac
  exec neurod run --home "$home" "$@"
fi
exec neurod "$@"
