#!/usr/bin/env bash
# Test hosts for the multi-host tests (issue #23): head, worker1, worker2 and laptop as Linux
# network namespaces on one bridge, in 198.18.0.0/24 (RFC 2544's benchmarking range: never a
# real network), each with its own HOME, data cache (MIM4DD_DATA) and TMPDIR, and one folder
# shared by all, standing in for NFS. Traffic stays inside this machine. Needs root
# (CAP_NET_ADMIN).
#
#   scripts/testbed.sh up                      # make the hosts; prints the testbed's folder
#   scripts/testbed.sh run HOST -- COMMAND...  # COMMAND on HOST, with HOST's environment
#   scripts/testbed.sh address HOST            # HOST's address
#   scripts/testbed.sh down                    # remove every namespace, link, process and
#                                              # folder it made; safe to repeat
#
# TESTBED_NAME (default mimtb, at most 8 characters: it prefixes interface names) keeps
# several testbeds apart; TESTBED_ROOT (default /tmp/$TESTBED_NAME) is where the folders live.
set -euo pipefail

NAME=${TESTBED_NAME:-mimtb}
ROOT=${TESTBED_ROOT:-/tmp/$NAME}
HOSTS=(head worker1 worker2 laptop)
declare -A ADDRESS=([head]=198.18.0.10 [worker1]=198.18.0.11 [worker2]=198.18.0.12
                    [laptop]=198.18.0.20)
BRIDGE="${NAME}br"

fail() { echo "testbed: $*" >&2; exit 1; }
[ ${#NAME} -le 8 ] || fail "TESTBED_NAME '$NAME' is longer than 8 characters"

host_env() {  # the environment a command on host $1 sees: its own home, cache and temp
  local dir="$ROOT/$1"
  echo "HOME=$dir/home" "MIM4DD_DATA=$dir/cache" "TMPDIR=$dir/tmp" \
       "TESTBED_HOST=$1" "TESTBED_ADDRESS=${ADDRESS[$1]}" "TESTBED_SHARED=$ROOT/shared"
}

up() {
  [ "$(id -u)" = 0 ] || fail "needs root (CAP_NET_ADMIN) to create network namespaces"
  trap down ERR  # a half-made testbed is removed, not left behind
  mkdir -p "$ROOT/shared"
  ip link add "$BRIDGE" type bridge
  ip link set "$BRIDGE" up
  local i=0
  for host in "${HOSTS[@]}"; do
    mkdir -p "$ROOT/$host/home" "$ROOT/$host/cache" "$ROOT/$host/tmp"
    ip netns add "$NAME-$host"
    ip link add "$NAME-v$i" type veth peer name eth0 netns "$NAME-$host"
    ip link set "$NAME-v$i" master "$BRIDGE" up
    ip -n "$NAME-$host" addr add "${ADDRESS[$host]}/24" dev eth0
    ip -n "$NAME-$host" link set eth0 up
    ip -n "$NAME-$host" link set lo up
    i=$((i + 1))
  done
  trap - ERR
  echo "$ROOT"
}

down() {
  local i=0
  for host in "${HOSTS[@]}"; do
    if ip netns list | grep -qw "$NAME-$host"; then
      # Processes still running in the host go with it: nothing outlives the testbed.
      ip netns pids "$NAME-$host" | xargs -r kill -9 2>/dev/null || true
    fi
    # Deleting one end of a veth pair deletes both, now; a namespace's deletion would take
    # its end along only later, asynchronously.
    ip link delete "$NAME-v$i" 2>/dev/null || true
    ip netns delete "$NAME-$host" 2>/dev/null || true
    i=$((i + 1))
  done
  ip link delete "$BRIDGE" 2>/dev/null || true
  rm -rf "$ROOT"
}

run() {
  local host=$1; shift
  [ -n "${ADDRESS[$host]:-}" ] || fail "unknown host '$host' (allowed: ${HOSTS[*]})"
  [ "${1:-}" = "--" ] && shift
  # shellcheck disable=SC2046  # the environment's words are meant to split
  exec ip netns exec "$NAME-$host" env $(host_env "$host") "$@"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  run) shift; run "$@" ;;
  address) [ -n "${ADDRESS[${2:-}]:-}" ] || fail "unknown host '${2:-}'"; echo "${ADDRESS[$2]}" ;;
  *) fail "usage: $0 up | run HOST -- COMMAND... | address HOST | down" ;;
esac
