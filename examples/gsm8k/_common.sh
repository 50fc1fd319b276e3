# Sourced by the run scripts: checks the inputs every GSM8K run needs.
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
: "${MODEL:?set MODEL to a local Qwen3 HF checkpoint directory, e.g. MODEL=/ckpt/Qwen3-0.6B}"
PRESET=${PRESET:-qwen3-0.6b}
for f in data/gsm8k_train.jsonl data/gsm8k_test.jsonl; do
  if [ ! -f "$f" ]; then
    echo "missing $f: convert GSM8K first:" >&2
    echo "  python examples/gsm8k/convert_gsm8k.py <gsm8k>/train.jsonl data/gsm8k_train.jsonl" >&2
    echo "  python examples/gsm8k/convert_gsm8k.py <gsm8k>/test.jsonl data/gsm8k_test.jsonl" >&2
    exit 1
  fi
done
