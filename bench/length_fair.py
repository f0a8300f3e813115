"""Length-fair unit scores (issue 18): short relevant units next to long blocks, and back.

Chat units run from five-token turns to whole code blocks and tool outputs. Three cases per NQ
question of the evaluation part (random distractors from other questions):

- *short gold among long blocks*: the gold passage (~135 tokens) among four blocks of five
  passages each (~650 tokens) and two code blocks (six paragraphs of ccproxy's own scorer source);
- *long gold among short units*: the gold passage inside a block of five passages, among six
  single passages;
- *equal-length passages*: the gold passage among 19 single passages, the reference's own case,
  where a unit's best stretch should change nothing.

Arms, all from one pass per prompt: the QR heads with the reference's plain sum over each unit
(before), the QR heads with each unit's best 64, 128 or 256 tokens (``unit_scores``), the MiniLM
encoder alone (best 254-token piece), and the default fusion of the encoder with the heads. The
figure is the share of prompts whose gold unit scores first.

    .venv/bin/python -m bench.length_fair --n-items 100      # ~6 min on 2 cores
"""

from __future__ import annotations

import argparse
import os
import random
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS_MD = ROOT / "docs" / "BENCHMARKS.md"
RESULTS_MD = ROOT / "bench" / "results" / "length_fair.md"
MARKS = ("<!-- length-fair:start -->", "<!-- length-fair:end -->")
WINDOWS = (64, 128, 256)


def cases(n_items: int, seed: int) -> list[tuple[str, str, list[str], int]]:
    """(case, question, units, gold index) for each item and case."""
    from nqdata.items import load_records

    records = load_records("eval")[:n_items]
    source = (ROOT / "ccproxy" / "compression" / "qrhead.py").read_text().split("\n\n")
    rng = random.Random(seed)
    out = []
    for record in records:
        others = rng.sample([r for r in load_records("eval") if r is not record], 30)
        gold = record.gold.render(1)
        blocks = ["\n\n".join(p.gold.render(j + 1) for j, p in enumerate(others[5 * k : 5 * k + 5])) for k in range(4)]
        blocks += ["```python\n" + "\n\n".join(rng.sample(source, 6)) + "\n```" for _ in range(2)]
        at = rng.randrange(len(blocks) + 1)
        out.append(("short gold among long blocks", record.question, blocks[:at] + [gold] + blocks[at:], at))
        block = "\n\n".join([others[20].gold.render(1), others[21].gold.render(2), gold,
                             others[22].gold.render(3), others[23].gold.render(4)])
        singles = [p.gold.render(1) for p in others[24:30]]
        at = rng.randrange(len(singles) + 1)
        out.append(("long gold among short units", record.question, singles[:at] + [block] + singles[at:], at))
        singles = [p.gold.render(1) for p in others[:19]]
        at = rng.randrange(len(singles) + 1)
        out.append(("equal-length passages", record.question, singles[:at] + [gold] + singles[at:], at))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-items", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite docs/BENCHMARKS.md")
    options = parser.parse_args(argv)
    command = "python -m bench.length_fair " + shlex.join(argv if argv is not None else sys.argv[1:])

    import torch

    from bench.compressor_bench import cpu_name
    from bench.load import publish, run_line
    from ccproxy.compression.fusion import fuse
    from ccproxy.compression.qrhead import UNIT_WINDOW_TOKENS, combined_heads, unit_scores
    from ccproxy.compression.scoring import load_scorer
    from ccproxy.settings import Settings

    torch.set_num_threads(options.threads)
    load_start = os.getloadavg()
    started = time.perf_counter()
    settings = Settings()
    fused = load_scorer(settings)  # the default scorer: its QR heads and its encoder
    qr, dense = fused.qr, fused.dense
    arms = ["QR heads, plain sum (before)"]
    arms += [f"QR heads, best {w} tokens" + (" (shipped)" if w == UNIT_WINDOW_TOKENS else "") for w in WINDOWS]
    arms += ["MiniLM alone", "default fusion (shipped)"]
    wins: dict[tuple[str, str], list[bool]] = {}
    sizes: dict[str, list[int]] = {}
    for case, question, units, gold in cases(options.n_items, options.seed):
        prompt = qr.build_prompt(question, units)
        assert len(prompt.context) + len(prompt.query_tail) <= qr.window_tokens, "one window per prompt"
        tokens = combined_heads(qr.token_scores(prompt, qr._group(qr.heads)), qr.head_weights)[0]
        plain = unit_scores(tokens, prompt.spans, window=None).tolist()
        best = {w: unit_scores(tokens, prompt.spans, window=w).tolist() for w in WINDOWS}
        encoder = dense.scores(question, units)
        default = fuse(unit_scores(tokens, prompt.spans).tolist(), encoder, settings.scoring_fusion_method,
                       settings.scoring_fusion_weight)
        for arm, scores in zip(arms, (plain, *best.values(), encoder, default), strict=True):
            wins.setdefault((case, arm), []).append(max(range(len(scores)), key=scores.__getitem__) == gold)
        sizes.setdefault(case, []).append(len(prompt.context))
    case_names = list(sizes)
    lines = [
        MARKS[0], "## Length-fair unit scores", "",
        run_line(command, f"{cpu_name()}, {options.threads} torch threads", (time.perf_counter() - started) / 60,
                 (load_start[0], os.getloadavg()[0])),
        "",
        "\n\n".join(__doc__.split("\n\n")[1:4]),
        "",
        "| arm | " + " | ".join(f"{case} (gold first; {options.n_items} prompts, ~{sum(sizes[case]) / len(sizes[case]):,.0f} tokens)"
                                 for case in case_names) + " |",
        "|---|" + "---:|" * len(case_names),
    ]
    for arm in arms:
        cells = " | ".join(f"{sum(wins[case, arm]) / len(wins[case, arm]):.3f}" for case in case_names)
        lines.append(f"| {arm} | {cells} |")
    lines += ["", MARKS[1], ""]
    publish("\n".join(lines), RESULTS_MD, None if options.no_docs else BENCHMARKS_MD, MARKS)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
