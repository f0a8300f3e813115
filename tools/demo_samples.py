"""Writes ccproxy/web/demo_samples.json: the sample RAG chats the demo page offers.

Each sample is a chat a retrieval-augmented application would send: ten Wikipedia passages
(one holds the answer), then the question, from the NaturalQuestions-Open evaluation data in
data/nq/ (CC BY-SA: the page says so). Fixed seeds, so the file only changes with the data.

    python tools/demo_samples.py          # rewrite the file
    python tools/demo_samples.py --check  # exit 1 if it differs from what would be written
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nqdata.items import load_records, random_distractor_items  # noqa: E402

TARGET = ROOT / "ccproxy" / "web" / "demo_samples.json"
DOCUMENTS = 10
SEEDS = (11, 23, 37)
SOURCE = (
    "NaturalQuestions-Open questions (Kwiatkowski et al., 2019; CC BY-SA 3.0) with Wikipedia "
    "passages (CC BY-SA), from data/nq/ (see its README)."
)


def generated() -> str:
    records = load_records("eval")
    samples = []
    for seed in SEEDS:
        [item] = random_distractor_items(records, DOCUMENTS, n_items=1, seed=seed)
        samples.append({"title": item.question, "messages": item.messages()})
    return json.dumps({"source": SOURCE, "samples": samples}, ensure_ascii=False, indent=1) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true")
    text = generated()
    if parser.parse_args().check:
        current = TARGET.read_text(encoding="utf-8") if TARGET.exists() else ""
        if current != text:
            print(f"{TARGET.relative_to(ROOT)} is stale: run python tools/demo_samples.py", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(text, encoding="utf-8")
    print(f"wrote {TARGET.relative_to(ROOT)} ({len(text):,} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
