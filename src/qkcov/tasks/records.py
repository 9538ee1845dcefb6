"""Contrast records: the shape every task shares (METHOD §2, §4).

A :class:`ContrastRecord` is one prompt plus *character* spans in it: the query span
(``None`` = the last token of the formatted prompt), positive key spans (the key's
feature matches the query's) and negative key spans (it differs). Token positions are
resolved later, from the tokenizer's offset mapping, by the runner.

Either side may be empty (not both): the lexical binding design emits a factual record
with only positives and a paired counterfactual record with only negatives, and the
covariance accumulator adds only the side a record provides.

Users give records as JSONL (see ``docs/contrast-records.md``); :func:`load_records`
validates every line and raises one ``ValueError`` listing all problems with their line
numbers, so nothing is ever computed from a half-valid file.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..artifacts import atomic_write_bytes, to_jsonable

__all__ = [
    "coin_flip",
    "KINDS",
    "feature_kinds",
    "Span",
    "ContrastRecord",
    "find_spans",
    "load_records",
    "save_records",
    "records_jsonl",
    "parse_records",
    "MAX_ERRORS_SHOWN",
    "parse_controls",
]

TOKEN_CHOICES = ("last", "first")
MAX_ERRORS_SHOWN = 20
_SPAN_KEYS = {"text", "occurrence", "start", "end", "token", "label", "attrs"}
ATTR_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")
RESERVED_ATTRS = ("offset", "none")  # controls qkcov computes itself
_RECORD_KEYS = {
    "prompt", "positives", "negatives", "query", "group", "system", "meta", "feature", "answer",
    "kind",
}  # fmt: skip
KINDS = ("class", "relation")  # what marks a feature's positive keys (see feature_kinds)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def find_spans(text: str, needle: str, *, ignore_case: bool = False) -> list[tuple[int, int]]:
    """All ``[start, end)`` occurrences of ``needle`` in ``text`` as a whole word.

    Word boundaries are required on a side only where ``needle`` begins/ends with a word
    character, so ``"pear"`` is not found inside ``"pearl"`` while ``"Box A"`` or ``","``
    still match. Occurrences do not overlap.
    """
    if not needle:
        raise ValueError("find_spans: empty needle")
    pattern = re.escape(needle)
    if re.match(r"\w", needle[0]):
        pattern = r"(?<!\w)" + pattern
    if re.match(r"\w", needle[-1]):
        pattern = pattern + r"(?!\w)"
    flags = re.IGNORECASE if ignore_case else 0
    return [(m.start(), m.end()) for m in re.finditer(pattern, text, flags)]


@dataclass(frozen=True)
class Span:
    """A ``[start, end)`` character span of the record's prompt text.

    ``token`` says which token of the span is the position (``"last"`` or ``"first"``);
    ``label`` is a display name (e.g. the item word). ``attrs`` are the key's named
    attributes (``{"role": "subject"}``): rival features a run can condition its label
    tests on (``--control offset,role``); stored as sorted ``(name, value)`` pairs.
    """

    start: int
    end: int
    token: str = "last"
    label: str | None = None
    attrs: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        attrs = self.attrs
        if isinstance(attrs, dict):
            attrs = tuple(sorted(attrs.items()))
        errors = _span_field_errors(self.start, self.end, self.token, self.label)
        errors += _attrs_errors(dict(attrs) if isinstance(attrs, tuple) else attrs)
        if errors:
            raise ValueError("Span: " + "; ".join(errors))
        object.__setattr__(self, "attrs", tuple(sorted(dict(attrs).items())))

    @property
    def attributes(self) -> dict[str, Any]:
        """``attrs`` as a dict."""
        return dict(self.attrs)

    def text(self, prompt: str) -> str:
        """The covered text of ``prompt``."""
        return prompt[self.start : self.end]

    def overlaps(self, other: Span) -> bool:
        return self.start < other.end and other.start < self.end

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"start": self.start, "end": self.end, "token": self.token}
        if self.label is not None:
            d["label"] = self.label
        if self.attrs:
            d["attrs"] = dict(self.attrs)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any], prompt: str | None = None) -> Span:
        """Build from ``{"start", "end"}`` or (given ``prompt``) ``{"text", "occurrence"}``."""
        span, errors = _parse_span(data, prompt, "span")
        if errors or span is None:
            raise ValueError("; ".join(errors))
        return span


def _span_field_errors(start: Any, end: Any, token: Any, label: Any) -> list[str]:
    errors = []
    if not _is_int(start) or not _is_int(end):
        errors.append(f"start/end must be integers, got {start!r}/{end!r}")
    elif start < 0 or end <= start:
        errors.append(f"need 0 <= start < end, got [{start}, {end})")
    if token not in TOKEN_CHOICES:
        errors.append(f"token must be one of {list(TOKEN_CHOICES)}, got {token!r}")
    if label is not None and not isinstance(label, str):
        errors.append(f"label must be a string, got {label!r}")
    return errors


def _attrs_errors(attrs: Any) -> list[str]:
    """``attrs``: an object of short names to strings, integers or booleans."""
    if not isinstance(attrs, dict):
        return [f"attrs must be an object of name: value, got {type(attrs).__name__}"]
    errors = []
    for k, v in attrs.items():
        if not isinstance(k, str) or not ATTR_NAME.match(k):
            errors.append(f"attrs: name {k!r} must be a letter or _ then letters, digits, _ . -")
        elif k in RESERVED_ATTRS:
            errors.append(
                f"attrs: {k!r} is computed by qkcov (--control {k}); rename the attribute"
            )
        if not isinstance(v, (str, int, bool)) or (isinstance(v, str) and not v):
            errors.append(
                f"attrs.{k}: must be a non-empty string, an integer or a boolean, got {v!r}"
            )
    return errors


CONTROL_NONE = "none"


def parse_controls(spec: Any) -> list[str]:
    """``--control`` → the names to condition on (``"offset,role"``; ``none`` or ``""`` =
    none: the label nulls then relabel at random, unconditioned)."""
    if not isinstance(spec, str):
        raise ValueError(
            f"--control must be a comma-separated list such as offset,role, got {spec!r}"
        )
    names = [x.strip() for x in spec.split(",") if x.strip()]
    if names == [CONTROL_NONE]:
        return []
    bad = [n for n in names if n == CONTROL_NONE or not ATTR_NAME.match(n)]
    if bad or len(set(names)) != len(names):
        raise ValueError(
            f"--control must name distinct controls (offset, or key attributes of the records "
            f"such as role), or none; got {spec!r}"
        )
    return names


def _parse_span(obj: Any, prompt: str | None, where: str) -> tuple[Span | None, list[str]]:
    """Parse one span entry; return ``(span, errors)`` with errors prefixed by ``where``."""
    if isinstance(obj, Span):
        obj = obj.to_dict()
    if not isinstance(obj, dict):
        return None, [f"{where}: must be an object, got {type(obj).__name__}"]
    errors: list[str] = []
    unknown = sorted(set(obj) - _SPAN_KEYS)
    if unknown:
        errors.append(f"{where}: unknown key(s) {unknown}; allowed {sorted(_SPAN_KEYS)}")
    token = obj.get("token", "last")
    label = obj.get("label")
    attrs = obj.get("attrs", {})
    if attrs is None:
        attrs = {}
    bad = _attrs_errors(attrs)
    if bad:
        return None, errors + [f"{where}: {e}" for e in bad]
    has_text = "text" in obj
    has_pos = "start" in obj or "end" in obj
    if has_text and has_pos:
        errors.append(f"{where}: give either 'text' or 'start'/'end', not both")
        return None, errors
    if not has_text and not has_pos:
        errors.append(f"{where}: needs 'text' (with optional 'occurrence') or 'start'/'end'")
        return None, errors
    if has_text:
        text, occ = obj["text"], obj.get("occurrence", 0)
        if not isinstance(text, str) or not text:
            errors.append(f"{where}: 'text' must be a non-empty string, got {text!r}")
            return None, errors
        if not _is_int(occ):
            errors.append(f"{where}: 'occurrence' must be an integer, got {occ!r}")
            return None, errors
        if prompt is None:
            errors.append(f"{where}: 'text' spans need the prompt")
            return None, errors
        found = find_spans(prompt, text)
        if not found:
            errors.append(f"{where}: {text!r} not found in prompt")
            return None, errors
        if not -len(found) <= occ < len(found):
            errors.append(
                f"{where}: occurrence {occ} of {text!r} out of range ({len(found)} found)"
            )
            return None, errors
        start, end = found[occ]
        if label is None:
            label = text
    else:
        start, end = obj.get("start"), obj.get("end")
    field_errors = _span_field_errors(start, end, token, label)
    if field_errors:
        return None, errors + [f"{where}: {e}" for e in field_errors]
    if prompt is not None and end > len(prompt):
        errors.append(f"{where}: [{start}, {end}) exceeds the prompt length {len(prompt)}")
    if errors:
        return None, errors
    return Span(start, end, token, label, tuple(sorted(attrs.items()))), []


def _record_errors(
    prompt: Any,
    positives: tuple[Span, ...],
    negatives: tuple[Span, ...],
    query: Span | None,
    group: Any,
    system: Any,
    meta: Any,
) -> list[str]:
    errors: list[str] = []
    if not isinstance(prompt, str) or not prompt:
        errors.append(f"prompt must be a non-empty string, got {prompt!r}")
        prompt = None
    if not positives and not negatives:
        errors.append("needs at least one positive or negative span (both are empty)")
    for name, spans in (("positives", positives), ("negatives", negatives)):
        for i, s in enumerate(spans):
            if not isinstance(s, Span):
                errors.append(f"{name}[{i}]: must be a Span, got {type(s).__name__}")
            elif prompt is not None and s.end > len(prompt):
                errors.append(
                    f"{name}[{i}]: [{s.start}, {s.end}) exceeds the prompt length {len(prompt)}"
                )
    if query is not None:
        if not isinstance(query, Span):
            errors.append(f"query: must be a Span or None, got {type(query).__name__}")
        elif prompt is not None and query.end > len(prompt):
            errors.append(
                f"query: [{query.start}, {query.end}) exceeds the prompt length {len(prompt)}"
            )
    for i, p in enumerate(positives):
        for j, n in enumerate(negatives):
            if isinstance(p, Span) and isinstance(n, Span) and p.overlaps(n):
                errors.append(
                    f"positives[{i}] [{p.start}, {p.end}) and negatives[{j}] "
                    f"[{n.start}, {n.end}) overlap"
                )
    if group is not None and not isinstance(group, str):
        errors.append(f"group must be a string or null, got {group!r}")
    if system is not None and not isinstance(system, str):
        errors.append(f"system must be a string or null, got {system!r}")
    if not isinstance(meta, dict):
        errors.append(f"meta must be an object, got {type(meta).__name__}")
    return errors


@dataclass(frozen=True)
class ContrastRecord:
    """One prompt with its query span and positive / negative key spans.

    ``prompt`` is the text the model sees (the user message when chat templating);
    spans index into it. ``query=None`` means the last token of the formatted prompt.
    ``group`` labels the record for per-group ΔC (e.g. the asked category); ``system``
    is an optional system message; ``meta`` is free JSON-able metadata; ``feature`` names
    the contrast the record belongs to when one file holds several (one ΔC family each,
    e.g. ``"order"`` and ``"lexical"``; ``None`` = the single default feature). ``answer`` is
    the text the model should produce next (its first token is the one the swaps' log-prob
    shift scores and the model's accuracy is measured on; ``None`` = score the first token of
    each key span). ``kind`` declares what marks the positive keys: ``"class"`` (a key
    property shared across records: a category, a number, a role), ``"relation"`` (a match
    with this record's query that differs per record: the repeated token, the bound letter,
    the name not yet used) or ``None`` (let the run detect it); it picks the label-sensitive
    test of the verdict (see :func:`feature_kinds`). ``line`` is
    the 1-based JSONL line the record was loaded from (set by :func:`parse_records`, used in
    error messages; never saved and ignored by ``==``).
    """

    prompt: str
    positives: tuple[Span, ...]
    negatives: tuple[Span, ...]
    query: Span | None = None
    group: str | None = None
    system: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    feature: str | None = None
    line: int | None = field(default=None, compare=False, repr=False)
    answer: str | None = None
    kind: str | None = None

    def __post_init__(self) -> None:
        if self.kind is not None and self.kind not in KINDS:
            raise ValueError(
                f"ContrastRecord: kind must be one of {list(KINDS)} or null, got {self.kind!r}"
            )
        if self.answer is not None and (not isinstance(self.answer, str) or not self.answer):
            raise ValueError(
                f"ContrastRecord: answer must be a non-empty string or null, got {self.answer!r}"
            )
        if self.feature is not None and (not isinstance(self.feature, str) or not self.feature):
            raise ValueError(
                f"ContrastRecord: feature must be a non-empty string or null, got {self.feature!r}"
            )
        object.__setattr__(self, "positives", tuple(self.positives))
        object.__setattr__(self, "negatives", tuple(self.negatives))
        errors = _record_errors(
            self.prompt,
            self.positives,
            self.negatives,
            self.query,
            self.group,
            self.system,
            self.meta,
        )
        values = {"prompt": self.prompt, "group": self.group, "system": self.system}
        errors += _value_errors({**values, "feature": self.feature, "meta": self.meta})
        if errors:
            raise ValueError("ContrastRecord: " + "; ".join(errors))

    def span_text(self, span: Span) -> str:
        """The text of ``span`` in this record's prompt."""
        return self.prompt[span.start : span.end]

    def to_dict(self) -> dict[str, Any]:
        """Canonical JSON form (spans as ``start``/``end``)."""
        return {
            "prompt": self.prompt,
            "positives": [s.to_dict() for s in self.positives],
            "negatives": [s.to_dict() for s in self.negatives],
            "query": None if self.query is None else self.query.to_dict(),
            "group": self.group,
            "system": self.system,
            "meta": to_jsonable(self.meta),
            **({} if self.feature is None else {"feature": self.feature}),
            **({} if self.answer is None else {"answer": self.answer}),
            **({} if self.kind is None else {"kind": self.kind}),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ContrastRecord:
        """Validate and build; spans may use the ``text``/``occurrence`` form."""
        record, errors = _parse_record(data)
        if errors or record is None:
            raise ValueError("invalid contrast record: " + "; ".join(errors))
        return record


MAX_DEPTH = 64  # nesting of a record's JSON (meta included)


def _value_errors(obj: Any) -> list[str]:
    """Strings that are not valid Unicode (a lone surrogate such as ``"\\ud800"``, which no
    tokenizer can encode) and nesting deeper than :data:`MAX_DEPTH`, naming the field."""
    stack: list[tuple[str, Any, int]] = [("", obj, 0)]
    while stack:
        where, value, depth = stack.pop()
        if depth > MAX_DEPTH:
            return [f"{where.split('.')[0] or 'record'}: nested deeper than {MAX_DEPTH} levels"]
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as err:
                return [
                    f"{where or 'record'}: not valid Unicode (a lone surrogate "
                    f"{value[err.start]!r} at character {err.start}, which no tokenizer can encode); remove it"
                ]
        elif isinstance(value, dict):
            for k, v in value.items():
                key = str(k)
                try:
                    shown = key.encode("utf-8") and key
                except UnicodeEncodeError:
                    return [
                        f"{where or 'record'}: key {key!r} is not valid Unicode (a lone surrogate)"
                    ]
                stack.append((f"{where}.{shown}" if where else shown, v, depth + 1))
        elif isinstance(value, (list, tuple)):
            stack.extend((f"{where}[{i}]", v, depth + 1) for i, v in enumerate(value))
    return []


def _parse_record(obj: Any, line: int | None = None) -> tuple[ContrastRecord | None, list[str]]:
    if not isinstance(obj, dict):
        return None, [f"record must be a JSON object, got {type(obj).__name__}"]
    bad = _value_errors(obj)
    if bad:
        return None, bad
    errors: list[str] = []
    unknown = sorted(set(obj) - _RECORD_KEYS)
    if unknown:
        errors.append(f"unknown key(s) {unknown}; allowed {sorted(_RECORD_KEYS)}")
    if "prompt" not in obj:
        errors.append("missing required key 'prompt'")
    prompt = obj.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        if "prompt" in obj:
            errors.append(f"prompt must be a non-empty string, got {prompt!r}")
        prompt = None
    sides: dict[str, list[Span]] = {}
    for name in ("positives", "negatives"):
        raw = obj.get(name, [])
        if raw is None:
            raw = []
        if not isinstance(raw, (list, tuple)):
            errors.append(f"{name} must be a list, got {type(raw).__name__}")
            raw = []
        sides[name] = []
        for i, entry in enumerate(raw):
            if prompt is None:
                continue
            span, errs = _parse_span(entry, prompt, f"{name}[{i}]")
            errors.extend(errs)
            if span is not None:
                sides[name].append(span)
    query = None
    if obj.get("query") is not None and prompt is not None:
        query, errs = _parse_span(obj["query"], prompt, "query")
        errors.extend(errs)
    if errors:
        return None, errors
    positives, negatives = tuple(sides["positives"]), tuple(sides["negatives"])
    group, system, meta = obj.get("group"), obj.get("system"), obj.get("meta", {})
    if meta is None:
        meta = {}
    errors = _record_errors(prompt, positives, negatives, query, group, system, meta)
    feature = obj.get("feature")
    if feature is not None and (not isinstance(feature, str) or not feature):
        errors.append(f"feature must be a non-empty string or null, got {feature!r}")
    answer = obj.get("answer")
    if answer is not None and (not isinstance(answer, str) or not answer.strip()):
        errors.append(f"answer must be a non-empty string or null, got {answer!r}")
    kind = obj.get("kind")
    if kind is not None and kind not in KINDS:
        errors.append(f"kind must be one of {list(KINDS)} or null, got {kind!r}")
    if errors:
        return None, errors
    record = ContrastRecord(
        prompt,
        positives,
        negatives,
        query,
        group,
        system,
        dict(meta),
        feature,
        line,
        answer,
        kind,
    )
    return record, []


def parse_records(lines: list[str], source: str = "records") -> list[ContrastRecord]:
    """Validate JSONL ``lines`` (blank lines skipped); all-or-nothing.

    Raises one ``ValueError`` listing every bad line as ``"line N: field: problem"``
    (the first :data:`MAX_ERRORS_SHOWN` shown), or if there is no record at all.
    """
    records: list[ContrastRecord] = []
    errors: list[str] = []
    bad_lines = 0
    n_nonblank = 0
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        n_nonblank += 1
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            errors.append(f"line {lineno}: invalid JSON ({exc.msg} at column {exc.colno})")
            bad_lines += 1
            continue
        except RecursionError:
            errors.append(f"line {lineno}: JSON nested too deeply (at most {MAX_DEPTH} levels)")
            bad_lines += 1
            continue
        record, errs = _parse_record(obj, lineno)
        if errs:
            bad_lines += 1
            errors.extend(f"line {lineno}: {e}" for e in errs)
        elif record is not None:
            records.append(record)
    if n_nonblank == 0:
        raise ValueError(f"{source}: no records (empty file)")
    if errors:
        shown = errors[:MAX_ERRORS_SHOWN]
        more = len(errors) - len(shown)
        msg = (
            f"{source}: {bad_lines} invalid record line(s); nothing was loaded:\n  "
            + "\n  ".join(shown)
        )
        if more:
            msg += f"\n  ... and {more} more error(s)"
        raise ValueError(msg)
    return records


def load_records(path: str | Path) -> list[ContrastRecord]:
    """Load and validate a JSONL file of contrast records (see ``docs/contrast-records.md``)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path}: is a folder, expected a JSONL file of contrast records")
    if not path.exists():
        raise FileNotFoundError(f"records file not found: {path}")
    from ..artifacts import read_regular_bytes  # a FIFO or device: one line, never a blocked read

    data = read_regular_bytes(path, cap=4 << 30, what="JSONL file of contrast records")
    try:
        text = data.decode("utf-8-sig")  # a leading BOM is tolerated
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise ValueError(
            f"{path}: line {line}: not valid UTF-8 (byte 0x{data[err.start]:02x} at column "
            f"{column}); save the records file as UTF-8"
        ) from None
    # split on "\n" only: str.splitlines() would also split inside prompts at U+2028, U+0085, ...
    return parse_records(text.split("\n"), source=str(path))


def records_jsonl(records: list[ContrastRecord]) -> bytes:
    """The bytes :func:`save_records` writes for ``records``."""
    lines = [
        json.dumps(to_jsonable(r.to_dict()), ensure_ascii=False, allow_nan=False) for r in records
    ]
    return ("\n".join(lines) + "\n").encode("utf-8")


def save_records(path: str | Path, records: list[ContrastRecord]) -> Path:
    """Write records atomically as JSONL, one canonical object per line."""
    records = list(records)
    if not records:
        raise ValueError("save_records: no records to save")
    return atomic_write_bytes(path, records_jsonl(records))


def coin_flip(records: list[ContrastRecord], seed: int = 0) -> list[ContrastRecord]:
    """The records with each one's positive and negative keys swapped by a fair coin (seeded):
    the relabelling every claim must not survive (benchmarks and tests of the verdicts)."""
    rng = random.Random(seed)
    return [
        dataclasses.replace(r, positives=r.negatives, negatives=r.positives)
        if rng.random() < 0.5
        else r
        for r in records
    ]


def feature_kinds(records: list[ContrastRecord]) -> dict[str | None, str | None]:
    """Each feature's declared ``kind`` (``None`` when no record of it declares one).

    Raises one ``ValueError`` when the records of a feature disagree — some declare a kind and
    others another, or some none — naming the feature and the first lines of each."""
    by: dict[str | None, dict[str | None, list[int | None]]] = {}
    for i, r in enumerate(records):
        by.setdefault(r.feature, {}).setdefault(r.kind, []).append(r.line or i + 1)
    out: dict[str | None, str | None] = {}
    for feature, kinds in by.items():
        if len(kinds) > 1:
            name = "the default feature" if feature is None else f"feature {feature!r}"
            parts = "; ".join(
                f"{'no kind' if k is None else repr(k)} on lines "
                + ", ".join(str(x) for x in lines[:5]) + (" ..." if len(lines) > 5 else "")
                for k, lines in kinds.items()
            )  # fmt: skip
            raise ValueError(
                f"records: {name} declares more than one kind ({parts}); give every record of "
                'a feature the same "kind" (class or relation) or none'
            )
        out[feature] = next(iter(kinds))
    return out
