"""Scoring shared by ``osum-eval`` and training-time evaluation: pure Python + numpy + jiwer (no torch).

* **WER / CER** with OSUM's normalisation (``tools/compute-wer.py --char=1``): every ``<...>`` span is removed
  (tags, timestamps, ``<开始回答>``), text is upper-cased, CJK characters are one token each, runs of other
  characters (English words, numbers) are one token; spaces and punctuation separate tokens and are dropped.
  CER additionally splits every token into characters (``compute-cer.py``). Alignment and counts: ``jiwer``.
  One deliberate difference from OSUM's script: ASCII punctuation glued to a word (``dog.``) is stripped too
  (OSUM's script only drops punctuation standing alone, so ``dog.`` vs ``dog`` counted as an error).
* **Tag accuracy** per tag field of the task (emotion, gender, age, style, event) with a confusion matrix; a
  missing hypothesis tag counts as ``<--no_tag-->`` (OSUM's ``compute-acc.py`` label). Accuracy is over the
  utterances present in both files (OSUM's script also divided by hypotheses without a reference).
* **SRWT timestamp error**: hypothesis and reference words with timestamps are aligned with jiwer; for the
  matched words, the mean absolute start / end error in seconds and the share within 0.1 s / 0.2 s.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from .parsing import expected_tags, is_align, is_transcribe, normalize_task, parse_output, parse_timestamps

NO_TAG = "<--no_tag-->"
OSUM_PUNCTUATION = set("!,?、。！，；？：「」︰『』《》")
_TAG_SPAN = re.compile(r"<[^<>]*>")


def _is_punct(ch: str) -> bool:
    return unicodedata.category(ch).startswith("P")


@dataclass(frozen=True)
class WerOptions:
    """compute-wer's options: ``ignore`` words dropped from both sides, ``cluster`` words scored as equal (each
    mapped to its class's first word), ``case_sensitive`` (default: upper-cased, as compute-wer)."""

    ignore: frozenset = frozenset()
    cluster: Mapping[str, str] = dataclass_field(default_factory=dict)
    case_sensitive: bool = False

    @classmethod
    def from_files(cls, ignore: str | None = None, cluster: str | None = None,
                   case_sensitive: bool = False) -> "WerOptions":
        """``ignore``: words separated by white space; ``cluster``: one class per line, words separated by white
        space (compute-wer's ``--ig`` / ``--cluster`` files)."""
        def words(path):
            try:
                return Path(path).read_text(encoding="utf-8").split()
            except OSError as e:
                raise ValueError(f"cannot read {path}: {e.strerror}") from None

        fold = (lambda w: w) if case_sensitive else str.upper
        ig = frozenset(fold(w) for w in words(ignore)) if ignore else frozenset()
        cl: dict[str, str] = {}
        if cluster:
            for line in Path(cluster).read_text(encoding="utf-8").splitlines():
                cls_words = [fold(w) for w in line.split()]
                for w in cls_words:
                    cl[w] = cls_words[0]
        return cls(ig, cl, case_sensitive)

    def apply(self, tokens: list[str]) -> list[str]:
        return [self.cluster.get(t, t) for t in tokens if t not in self.ignore]


DEFAULT_WER = WerOptions()


def tokenize_for_wer(text: str, options: WerOptions = DEFAULT_WER) -> list[str]:
    """OSUM's ``characterize`` after ``remove_tag``: CJK per character, other runs per word, upper case.

    Words split at white space and at OSUM's punctuation list (``, 。 ！ ...``, as compute-wer.py); punctuation
    inside a word stays (``3.5``, ``U.S.A``, ``well-known``, ``don't``, curly apostrophes read as ``'``), and
    punctuation at a word's ends is stripped (``hello.`` = ``hello``, ``(yes)`` = ``yes``)."""
    text = _TAG_SPAN.sub(" ", text or "")
    text = (text if options.case_sensitive else text.upper()).replace("\u2019", "'").replace("\u2018", "'")
    tokens: list[str] = []
    word = ""

    def flush():
        w = word
        while w and _is_punct(w[0]):
            w = w[1:]
        while w and _is_punct(w[-1]):
            w = w[:-1]
        if w:
            tokens.append(w)

    for ch in text:
        cat = unicodedata.category(ch)
        if ch.isspace() or cat in ("Zs", "Cn") or ch in OSUM_PUNCTUATION:
            flush()
            word = ""
        elif cat == "Lo":  # CJK and other "letter, other" characters: one token each
            flush()
            word = ""
            tokens.append(ch)
        else:
            word += ch
    flush()
    return options.apply(tokens)


def tokenize_for_cer(text: str, options: WerOptions = DEFAULT_WER) -> list[str]:
    return [c for tok in tokenize_for_wer(text, options) for c in tok]


def error_counts(refs: Sequence[Sequence[str]], hyps: Sequence[Sequence[str]]) -> dict:
    """Sum of substitutions, deletions, insertions over utterances (token lists), via jiwer's alignment."""
    import jiwer

    sub = dele = ins = hits = 0
    pairs = [(r, h) for r, h in zip(refs, hyps)]
    nonempty = [(r, h) for r, h in pairs if r]
    for r, h in pairs:
        if not r:  # jiwer refuses empty references: every hypothesis token is an insertion
            ins += len(h)
    if nonempty:
        out = jiwer.process_words([" ".join(r) for r, _ in nonempty], [" ".join(h) for _, h in nonempty])
        sub, dele, ins, hits = out.substitutions, out.deletions, ins + out.insertions, out.hits
    n = sum(len(r) for r in refs)
    errors = sub + dele + ins
    return {"errors": errors, "ref_tokens": n, "substitutions": sub, "deletions": dele, "insertions": ins,
            "hits": hits, "rate": errors / n if n else (0.0 if errors == 0 else float("inf")),
            "utterances": len(pairs)}


def wer(refs: Sequence[str], hyps: Sequence[str], options: WerOptions = DEFAULT_WER) -> dict:
    return error_counts([tokenize_for_wer(r, options) for r in refs], [tokenize_for_wer(h, options) for h in hyps])


def cer(refs: Sequence[str], hyps: Sequence[str], options: WerOptions = DEFAULT_WER) -> dict:
    return error_counts([tokenize_for_cer(r, options) for r in refs], [tokenize_for_cer(h, options) for h in hyps])


def alignment(key: str, ref: Sequence[str], hyp: Sequence[str]) -> str:
    """One utterance as compute-wer ``--v=1`` lists it: its error counts and the aligned ``lab:`` / ``rec:``
    rows (``*`` fills a deletion or insertion; columns padded to the wider token)."""
    import jiwer

    n = len(ref)
    if not ref:
        counts = (0, 0, 0, len(hyp))
        lab, rec = ["*"] * len(hyp), list(hyp)
    else:
        out = jiwer.process_words(" ".join(ref), " ".join(hyp) if hyp else "")
        lab, rec = [], []
        for c in out.alignments[0]:
            r, h = ref[c.ref_start_idx:c.ref_end_idx], list(hyp[c.hyp_start_idx:c.hyp_end_idx])
            if c.type in ("equal", "substitute"):
                lab += r
                rec += h
            elif c.type == "delete":
                lab += r
                rec += ["*"] * len(r)
            else:
                lab += ["*"] * len(h)
                rec += h
        counts = (out.hits, out.substitutions, out.deletions, out.insertions)
    hits, sub, dele, ins = counts
    rate = 100.0 * (sub + dele + ins) / n if n else 0.0
    widths = [max(len(a), len(b)) for a, b in zip(lab, rec)]
    return "\n".join([f"utt: {key}", f"WER: {rate:.2f} % N={n} C={hits} S={sub} D={dele} I={ins}",
                      "lab: " + " ".join(a.ljust(w) for a, w in zip(lab, widths)).rstrip(),
                      "rec: " + " ".join(b.ljust(w) for b, w in zip(rec, widths)).rstrip(), ""])


def tag_accuracy(ref_tags: Sequence[str], hyp_tags: Sequence[str | None]) -> dict:
    """Accuracy and confusion matrix (rows: reference, columns: hypothesis; labels sorted, no-tag last)."""
    hyp = [h if h else NO_TAG for h in hyp_tags]
    labels = sorted(set(ref_tags) | set(hyp) - {NO_TAG}) + ([NO_TAG] if NO_TAG in hyp else [])
    idx = {lab: i for i, lab in enumerate(labels)}
    matrix = np.zeros((len(labels), len(labels)), np.int64)
    for r, h in zip(ref_tags, hyp):
        matrix[idx[r], idx[h]] += 1
    correct = int(sum(r == h for r, h in zip(ref_tags, hyp)))
    n = len(ref_tags)
    return {"accuracy": correct / n if n else 0.0, "correct": correct, "total": n, "labels": labels,
            "confusion": matrix.tolist()}


def confusion_table(report: Mapping) -> str:
    """A markdown table of a :func:`tag_accuracy` confusion matrix."""
    labels = report["labels"]
    lines = ["| ref \\ hyp | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    for lab, row in zip(labels, report["confusion"]):
        lines.append(f"| {lab} | " + " | ".join(str(v) for v in row) + " |")
    return "\n".join(lines)


def plot_confusion(report: Mapping, path, title: str = "") -> None:
    """Save the confusion matrix as a PNG (matplotlib, Agg backend; imported only here)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = report["labels"]
    m = np.asarray(report["confusion"])
    size = max(3.0, 0.6 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(m, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels=labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels=labels)
    ax.set_xlabel("hypothesis")
    ax.set_ylabel("reference")
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            ax.text(j, i, str(m[i, j]), ha="center", va="center",
                    color="white" if m[i, j] > m.max() / 2 else "black")
    ax.set_title(title or f"accuracy {report['accuracy']:.3f} ({report['correct']}/{report['total']})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def timestamp_error(ref_items: Sequence[Sequence[Mapping]], hyp_items: Sequence[Sequence[Mapping]]) -> dict:
    """SRWT: align words per utterance; mean |start| / |end| error (s) over matched words and shares within
    0.1 s / 0.2 s (both boundaries)."""
    import jiwer

    starts, ends = [], []
    ref_words = hyp_words = 0
    for ref, hyp in zip(ref_items, hyp_items):
        ref_words += len(ref)
        hyp_words += len(hyp)
        if not ref or not hyp:
            continue
        rtok = ["".join(tokenize_for_wer(x["token"])) or "_" for x in ref]
        htok = ["".join(tokenize_for_wer(x["token"])) or "_" for x in hyp]
        out = jiwer.process_words(" ".join(rtok), " ".join(htok))
        for chunk in out.alignments[0]:
            if chunk.type != "equal":
                continue
            for k in range(chunk.ref_end_idx - chunk.ref_start_idx):
                r, h = ref[chunk.ref_start_idx + k], hyp[chunk.hyp_start_idx + k]
                starts.append(abs(h["start"] - r["start"]))
                ends.append(abs(h["end"] - r["end"]))
    s, e = np.asarray(starts), np.asarray(ends)
    both = np.maximum(s, e) if s.size else s
    return {"matched_words": int(s.size), "ref_words": ref_words, "hyp_words": hyp_words,
            "mean_abs_start_s": float(s.mean()) if s.size else None,
            "mean_abs_end_s": float(e.mean()) if e.size else None,
            "mean_abs_boundary_s": float((s.sum() + e.sum()) / (2 * s.size)) if s.size else None,
            "within_0.1s": float((both <= 0.1 + 1e-9).mean()) if s.size else None,
            "within_0.2s": float((both <= 0.2 + 1e-9).mean()) if s.size else None}


def score_task(task: str, pairs: Sequence[tuple[str, str, str]], options: WerOptions = DEFAULT_WER) -> dict:
    """One task's report from ``(key, reference text, hypothesis text)`` triples; with an ``alignment`` list of
    compute-wer ``--v=1`` blocks per utterance for transcription tasks."""
    task = normalize_task(task)
    refs = [r for _, r, _ in pairs]
    hyps = [h for _, _, h in pairs]
    report: dict = {"task": task, "utterances": len(pairs)}
    if is_transcribe(task):
        pr = [parse_output(r, task) for r in refs]
        ph = [parse_output(h, task) for h in hyps]
        report["wer"] = wer([p["transcript"] for p in pr], [p["transcript"] for p in ph], options)
        report["cer"] = cer([p["transcript"] for p in pr], [p["transcript"] for p in ph], options)
        report["alignment"] = [alignment(k, tokenize_for_wer(a["transcript"], options),
                                         tokenize_for_wer(b["transcript"], options))
                               for (k, _, _), a, b in zip(pairs, pr, ph)]
    for field in expected_tags(task):
        ref_t, hyp_t = [], []
        for r, h in zip(refs, hyps):
            rt = parse_output(r, task)["tags"].get(field)
            if rt is None:
                continue  # the reference has no tag of this kind: not scored
            ref_t.append(rt)
            hyp_t.append(parse_output(h, task)["tags"].get(field))
        if ref_t:
            report.setdefault("tags", {})[field] = tag_accuracy(ref_t, hyp_t)
    if is_align(task):
        report["timestamps"] = timestamp_error([parse_timestamps(r) for r in refs],
                                               [parse_timestamps(h) for h in hyps])
    return report


def score(refs: Mapping[str, str], hyps: Mapping[str, str], tasks: Mapping[str, str] | None = None,
          task: str | None = None, options: WerOptions = DEFAULT_WER) -> dict:
    """Reports per task for the keys present in both ``refs`` and ``hyps`` (``{key: text}``).

    The task of a key is ``task`` if given, else ``tasks[key]``, else ``<TRANSCRIBE>``. Returns
    ``{"tasks": {task: report}, "missing_hyp": [...], "missing_ref": [...]}``.
    """
    groups: dict[str, list[tuple[str, str, str]]] = {}
    for key in refs:
        if key in hyps:
            t = normalize_task(task or (tasks or {}).get(key))
            groups.setdefault(t, []).append((key, refs[key], hyps[key]))
    return {"tasks": {t: score_task(t, pairs, options) for t, pairs in sorted(groups.items())},
            "missing_hyp": sorted(k for k in refs if k not in hyps),
            "missing_ref": sorted(k for k in hyps if k not in refs)}


def format_report(report: Mapping) -> str:
    """Markdown for one task's report."""
    lines = [f"# {report['task']}", "", f"utterances: {report['utterances']}", ""]
    for name in ("wer", "cer"):
        if name in report:
            r = report[name]
            lines.append(f"- {name.upper()}: {100 * r['rate']:.2f} % ({r['errors']} errors / {r['ref_tokens']} "
                         f"tokens; S {r['substitutions']}, D {r['deletions']}, I {r['insertions']})")
    for field, r in report.get("tags", {}).items():
        lines += ["", f"## {field}: accuracy {100 * r['accuracy']:.2f} % ({r['correct']}/{r['total']})", "",
                  confusion_table(r)]
    if "timestamps" in report:
        r = report["timestamps"]
        lines += ["", "## timestamps (SRWT)", ""]
        lines += [f"- {k}: {v}" for k, v in r.items()]
    return "\n".join(lines) + "\n"


def read_text_file(path) -> dict[str, str]:
    """``key<TAB or space>text`` lines (OSUM's text format) -> ``{key: text}``."""
    out: dict[str, str] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line.strip():
                continue
            parts = line.split(None, 1)
            out[parts[0]] = parts[1] if len(parts) > 1 else ""
    return out
