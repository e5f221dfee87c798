"""The JSON protocol between lockstep (Rust: crates/lockstep-cli/src/harness/protocol.rs) and this
package: one dataclass per request and per answer.

Requests are parsed strictly (`parse`): a missing required field or an unknown one is an error that
names the field and the request, never a silent default. Answers are built as dataclasses and
printed with `answer_line`, so every field the Rust side requires is always there.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field

T = typing.TypeVar("T")


class ProtocolError(ValueError):
    """A request that does not follow the protocol (missing, unknown or mistyped field)."""


@dataclass(frozen=True)
class TraceJob:
    """One trace to write (`trace-batch`)."""

    model: str
    tokens: list[int]
    dtype: str
    out: str
    #: The trace computed layer by layer (streamed.py), for models too big for RAM in `dtype`.
    streamed: bool = False


@dataclass(frozen=True)
class OpsJob:
    """One op-level job (`ops-batch`): every op of the `test` trace recomputed on its own inputs."""

    model: str
    test: str
    dtype: str
    out_exact: str
    #: transformers' own ops in `dtype`; None for the f64 tier.
    out_reference: str | None
    #: The ops computed layer by layer (ops.py's streamed path), for models whose float64 copy does not
    #: fit in memory.
    streamed: bool = False


@dataclass(frozen=True)
class GenerateJob:
    """One greedy generation (`generate-batch`); exactly one prompt source is given."""

    model: str
    max_new_tokens: int
    ignore_eos: bool
    tokens: list[int] | None = None
    token_batch: list[list[int]] | None = None
    prompt: str | None = None
    messages: list[dict] | None = None
    repetition_penalty: float = 1.0
    #: The compute dtype the model is loaded in: "f32" (the default) or "bf16".
    dtype: str = "f32"
    #: List, per generated step, every token whose score is within this of the step's best (at
    #: least `TOP_K`, at most `TOP_MAX`): the verifier's near-tie tolerance.
    tie_within: float = 0.0

    def __post_init__(self) -> None:
        given = [n for n in ("tokens", "token_batch", "prompt", "messages") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ProtocolError(f"generate job for {self.model}: give exactly one of tokens, token_batch, "
                                f"prompt, messages (got {given or 'none'})")
        if self.dtype not in ("f32", "bf16"):
            raise ProtocolError(f"generate job for {self.model}: dtype must be f32 or bf16, not {self.dtype!r}")


@dataclass(frozen=True)
class Conversation:
    """One conversation to render (`chat-batch`)."""

    messages: list[dict]
    tools: list[dict] | None = None
    #: Extra variables for the template, as `apply_chat_template(**kwargs)` passes them
    #: (Qwen3's `enable_thinking`).
    template_kwargs: dict | None = None


@dataclass(frozen=True)
class WeightsAnswer:
    """What transformers loaded (`weights`)."""

    #: sha256 of each state_dict tensor's bytes, in the loaded (stored) dtype.
    checksums: dict[str, str]
    parameter_count: int
    tied: bool
    qkv_bias: bool
    dtype: str


@dataclass(frozen=True)
class ChatAnswer:
    """One rendered conversation (`chat-batch`)."""

    text: str
    ids: list[int]


@dataclass(frozen=True)
class GenerateAnswer:
    """One generation (`generate-batch`); for a `token_batch` job each field holds a list of rows."""

    prompt_ids: list
    generated: list
    eos_token_ids: list[int]
    pad_token_id: int
    top_ids: list
    top_logits: list = field(default_factory=list)


_SIMPLE = {int: int, float: (int, float), str: str, bool: bool, list: list, dict: dict}


def _check_type(cls_name: str, name: str, hint, value) -> None:
    """Checks `value` against a field's annotation (outer type only; None allowed for Optional)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return
        hint = next(a for a in args if a is not type(None))
        origin = typing.get_origin(hint)
    expect = _SIMPLE.get(origin or hint)
    if expect is None:
        return
    if (isinstance(value, bool) and hint is not bool) or not isinstance(value, expect):
        raise ProtocolError(f"{cls_name}: field {name!r} should be {getattr(hint, '__name__', hint)}, "
                            f"got {type(value).__name__}")


def parse(cls: type[T], obj) -> T:
    """`obj` (a decoded JSON object) as a `cls`, refusing missing, unknown or mistyped fields."""
    if not isinstance(obj, dict):
        raise ProtocolError(f"{cls.__name__}: expected a JSON object, got {type(obj).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(obj) - set(fields))
    if unknown:
        raise ProtocolError(f"{cls.__name__}: unknown field(s) {unknown}")
    missing = [n for n, f in fields.items() if n not in obj
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ProtocolError(f"{cls.__name__}: missing field(s) {missing}")
    for name, value in obj.items():
        _check_type(cls.__name__, name, hints[name], value)
    return cls(**obj)


def parse_list(cls: type[T], path: str) -> list[T]:
    """The JSON list in the file `path`, each entry parsed as a `cls`."""
    with open(path) as f:
        items = json.load(f)
    if not isinstance(items, list):
        raise ProtocolError(f"{path}: expected a JSON list of {cls.__name__}")
    return [parse(cls, item) for item in items]


def answer_line(answer) -> str:
    """One answer (a dataclass or a list of them) as the single JSON line the Rust side reads."""
    if isinstance(answer, list):
        return json.dumps([dataclasses.asdict(a) for a in answer], ensure_ascii=False)
    return json.dumps(dataclasses.asdict(answer), ensure_ascii=False)
