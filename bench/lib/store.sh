# Sourced by the store benchmarks (store.sh, memory.sh, store-clone.sh).
#
# stored_bytes VMNEST STORE: the store's stored bytes as `vmnest du --output json` reports them
# (its top-level "stored_bytes"); fails when the command or the key does.
stored_bytes() {
  "$1" --store "$2" du --output json |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["stored_bytes"])'
}
