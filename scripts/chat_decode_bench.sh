#!/usr/bin/env bash
# Decode benchmark (issue #15): `termtune chat` on GGUF files, 128 greedy tokens after a ~100-token prompt; prints
# termtune's own timing line for each file (prompt tokens/s, decode tokens/s).
#
#   scripts/chat_decode_bench.sh TERMTUNE_BINARY FILE.gguf [FILE.gguf …]
#
# Not run in CI (a benchmark, not a test). Run it on an idle machine: other jobs on the cores change the numbers.
set -euo pipefail
bin=$1
shift
prompt="Write a long, detailed story about a young girl named Lily who lives in a small village by the sea. She \
dreams of becoming a sailor and exploring the world beyond the horizon. One day, an old fisherman tells her about a \
hidden island where a treasure is buried. Describe her preparation, the journey, the storms she faces, the friends \
she makes, and what she finds on the island. Use vivid descriptions of the ocean, the sky and the people."
for gguf in "$@"; do
    echo "== $gguf"
    "$bin" chat --model "$gguf" --prompt "$prompt" --temperature 0 --max-new-tokens 128 2>&1 >/dev/null |
        grep -E "tokens/s" || true
done
