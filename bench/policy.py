"""Figures for the caption policy, from the corpora in tests/fixtures/ (no server needed).

    python3 bench/policy.py

Prints: how many legitimate captions reach the file whole and unflagged; how many messy answers
end clean or flagged with the rule their fixture names (never written silently); the
faithfulness check's false flags on the legitimate captions and catches on planted inventions;
and how long clean() takes per MB of answer, for each form of answer.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import ollama_generate as og  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"


def lines(path: Path) -> list[dict]:
    """One JSON object per line."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def written(answer: str, style: str, description: str = "", *, trigger: str = "",
            cut_off: bool = False) -> og.Caption | None:
    """What the caption stage makes of one answer, through its own calls (style: a STYLES row)."""
    spec = og.CaptionSpec(style=style.removesuffix("-creative"), creative=style.endswith("-creative"),
                          trigger=trigger)
    draft = og.judge_caption(og.Answer(text=answer, done_reason="length" if cut_off else "stop"), spec)
    return og.finish_caption(draft, spec, description) if draft.body else None


def legitimate() -> tuple[int, int]:
    """Legitimate answers kept word for word with no flag."""
    entries = lines(FIXTURES / "legitimate" / "captions.jsonl")
    kept = 0
    for entry in entries:
        if entry["style"] in og.CAPTION_STYLES:
            caption = written(entry["answer"], entry["style"], entry["description"], trigger=entry["trigger"])
            body = og.continue_after_chunk(entry["answer"]) if entry["trigger"] else entry["answer"]
            kept += bool(caption) and caption.text == og.layout_caption(body, trigger=entry["trigger"]) \
                and not caption.review and not caption.fired
        else:
            cleaned = og.clean(entry["answer"], og.STYLES[entry["style"]])
            expected = entry["answer"] if entry["style"] != "prompt-clip" else \
                ", ".join(tag.strip() for tag in entry["answer"].split(","))
            kept += cleaned.text == expected and not cleaned.fired and not cleaned.refused
    return kept, len(entries)


def messy() -> tuple[int, int, int, int]:
    """Messy answers that end as their fixture says (clean, flagged by the named rule, or unusable);
    and how many of them are real answers from a small local model."""
    good = total = real_good = real_total = 0
    for path in sorted((FIXTURES / "answers").glob("*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        real = "real" in (data["category"] if isinstance(data["category"], list) else [data["category"]])
        for style, expected in data["expected"].items():
            caption = written(data["answer"], style, data.get("description", ""), cut_off=data["cut_off"])
            review = caption.review if caption and "description" in data else \
                [reason for reason in caption.review if not reason.startswith(("it has", "about", "invented"))] \
                if caption else []
            ok = caption is None if expected is None else caption is not None and caption.text == expected \
                and review == data.get("flags", {}).get(style, [])
            good += ok
            total += 1
            real_good += ok and real
            real_total += real
    return good, total, real_good, real_total


def real_outcomes() -> tuple[int, int, int]:
    """The real answers of a small local model: written clean, written but needs review, unusable."""
    clean = flagged = unusable = 0
    for path in sorted((FIXTURES / "answers").glob("*-real-*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        for style in data["expected"]:
            caption = written(data["answer"], style, data["description"], cut_off=data["cut_off"])
            clean += bool(caption) and not caption.review
            flagged += bool(caption) and bool(caption.review)
            unusable += caption is None
    return clean, flagged, unusable


def faithfulness() -> tuple[int, int, int, int]:
    """False flags on legitimate captions, and catches among planted inventions."""
    legit = [e for e in lines(FIXTURES / "legitimate" / "captions.jsonl") if e["style"] in og.CAPTION_STYLES]
    planted = lines(FIXTURES / "legitimate" / "planted.jsonl")

    def flagged(entry: dict) -> bool:
        caption = written(entry["answer"], entry["style"], entry["description"], trigger=entry.get("trigger", ""))
        return any(reason.startswith("invented: ") for reason in caption.review)

    return sum(map(flagged, legit)), len(legit), sum(map(flagged, planted)), len(planted)


def clean_speed() -> dict[str, float]:
    """Seconds clean() takes per MB of answer, for each form, on a 1 MB answer."""
    answer = "A fox runs through snow under a pale sky, past a red barn and two bare trees. " * 13_000
    seconds = {}
    for name in ("training", "tags", "describe"):
        started = time.perf_counter()
        og.clean(answer, og.STYLES[name])
        seconds[name] = (time.perf_counter() - started) / (len(answer.encode()) / 1e6)
    return seconds


def main() -> None:
    kept, total = legitimate()
    print(f"legitimate answers kept whole and unflagged: {kept}/{total}")
    good, count, real_good, real_count = messy()
    print(f"messy answers clean or flagged as their fixture says: {good}/{count} "
          f"(real answers from a small local model: {real_good}/{real_count})")
    clean, flagged, unusable = real_outcomes()
    print(f"real answers: {clean} written clean (each read by hand), {flagged} written and listed as needs "
          f"review, {unusable} unusable (asked again)")
    false_flags, legit, caught, planted = faithfulness()
    print(f"faithfulness: {false_flags}/{legit} legitimate captions flagged, {caught}/{planted} planted "
          "inventions caught")
    speed = clean_speed()
    print("clean() per MB of answer: " + ", ".join(f"{name} {value:.2f} s" for name, value in speed.items()))


if __name__ == "__main__":
    main()
