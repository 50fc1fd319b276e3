"""Convert GSM8K (public jsonl: {"question": ..., "answer": "...reasoning...\\n#### 72"}) to
the RL prompt format: {"prompt": [chat messages], "label": "72"}.

    python examples/gsm8k/convert_gsm8k.py train.jsonl data/gsm8k_train.jsonl
    python examples/gsm8k/convert_gsm8k.py test.jsonl  data/gsm8k_test.jsonl

The prompt asks for the final answer in \\boxed{}, which the built-in "math" reward grades.
The label is the number after "####" with thousands separators removed ("1,000" -> "1000").
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

INSTRUCTION = "Let's think step by step and output the final answer within \\boxed{}."


class ConvertError(ValueError):
    """A GSM8K line that cannot be converted; the message names the file and line."""


def convert_record(where: str, rec: object) -> dict:
    if not isinstance(rec, dict):
        raise ConvertError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    for key in ("question", "answer"):
        if not isinstance(rec.get(key), str):
            raise ConvertError(f"{where}: missing string field {key!r}; GSM8K lines have 'question' and 'answer'")
    if "####" not in rec["answer"]:
        raise ConvertError(f"{where}: 'answer' has no '#### <number>' final line: {rec['answer'][-60:]!r}")
    label = rec["answer"].rsplit("####", 1)[1].strip().replace(",", "")
    if not label:
        raise ConvertError(f"{where}: nothing after '####' in 'answer'")
    prompt = [{"role": "user", "content": f"{rec['question'].strip()}\n{INSTRUCTION}"}]
    return {"prompt": prompt, "label": label}


def convert_file(src: str | Path, dst: str | Path) -> int:
    """Convert every non-empty line of `src` into `dst`; returns the number of records."""
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise ConvertError(f"{src}: no such file (download GSM8K's train.jsonl / test.jsonl first)")
    out = []
    with open(src) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConvertError(f"{src}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
            out.append(convert_record(f"{src}:{lineno}", rec))
    if not out:
        raise ConvertError(f"{src}: the file holds no records")
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text("".join(json.dumps(r) + "\n" for r in out))
    return len(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="GSM8K jsonl -> miles-fsdp RL prompt jsonl")
    parser.add_argument("src", help="GSM8K jsonl (question/answer per line)")
    parser.add_argument("dst", help="output jsonl (prompt/label per line)")
    args = parser.parse_args(argv)
    try:
        n = convert_file(args.src, args.dst)
    except ConvertError as e:
        print(f"convert_gsm8k: {e}", file=sys.stderr)
        return 1
    print(f"wrote {n} prompts to {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
