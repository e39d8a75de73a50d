"""Helix configuration: one object, three spellings, one validation.

A Helix layout re-shards the same N ranks twice per layer: attention runs on a
KVP x TPA grid (KV cache split along the sequence KVP ways, heads split TPA ways),
the FFN on a TPF x EP grid. The same :class:`HelixConfig` comes from a ``--helix``
string (``kvp=4,tpa=2,tpf=8,ep=1,hopb=2``), a YAML file (``configs/*.yaml``) or a
dict (vLLM's ``additional_config["helix"]``); all three go through
:meth:`HelixConfig.from_dict`, so they cannot drift apart.

Validation needs the world size and the model's shape, which are only known at
start-up; :meth:`HelixConfig.validate` raises a :class:`HelixConfigError` naming
the violated constraint, the offending values and a layout that would work.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml

_INT_FIELDS = ("kvp", "tpa", "tpf", "ep", "hopb", "stripe")
_DECIMAL = re.compile(r"0|[1-9][0-9]*")  # ASCII digits, no sign, no leading zero, no '_' (int() takes all three)
# Upper bounds that catch typos before they reach vLLM: no engine has more ranks, and a HOP-B
# micro-batch holds at least one request of vLLM's largest default batch (max_num_seqs 256).
_LIMITS = {"kvp": 65536, "tpa": 65536, "tpf": 65536, "ep": 65536, "hopb": 256, "stripe": 65536}


def _strict_int(key: str, raw: str) -> int:
    """An option's value as written by a person: plain ASCII decimal, else refused (``2_0`` is not 20)."""
    if not _DECIMAL.fullmatch(raw):
        raise HelixConfigError(f"helix option {key}={raw!r} must be a positive integer in plain decimal digits "
                               f"(0-9, no leading zero, sign or '_'), e.g. {key}=2")
    return int(raw)


class _StrictYAMLLoader(yaml.SafeLoader):
    """YAML for presets without YAML 1.1's surprises: integers are plain decimals (``010`` and ``1:04``
    stay strings, so they are refused rather than read as 8 and 64) and a key given twice is an error."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise HelixConfigError(f"key {key!r} is given twice (line {key_node.start_mark.line + 1}); "
                                       "keep one")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_StrictYAMLLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:int"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_StrictYAMLLoader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^(?:0|-?[1-9][0-9]*)$"),
                                        list("-0123456789"))
_StrictYAMLLoader.add_constructor("tag:yaml.org,2002:map", _StrictYAMLLoader.construct_mapping)


class HelixConfigError(ValueError):
    """A Helix option violates a constraint; the message names the constraint and a fix."""


@dataclass(frozen=True)
class ModelShape:
    """The few facts about a model that constrain a Helix layout.

    ``num_kv_heads`` is 1 for MLA (the compressed latent is one KV head shared by
    every query head). ``num_experts`` is 0 for dense models.
    """

    num_q_heads: int
    num_kv_heads: int
    is_mla: bool = False
    num_experts: int = 0
    moe_intermediate_size: int = 0
    block_size: int = 16


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True)
class HelixConfig:
    """A Helix layout.

    Attributes:
        kvp: KV-parallel width: ranks that split each sequence's KV cache.
        tpa: tensor parallelism in attention (query/KV heads split this many ways).
        tpf: tensor parallelism in the FFN; defaults to ``kvp * tpa // ep``.
        ep: expert parallelism in MoE FFN layers; defaults to 1.
        hopb: HOP-B micro-batches per decode step; 1 turns the overlap off.
        stripe: tokens per KV stripe placed on one KVP rank before moving to the
            next; ``None`` means "the KV block size" (whole blocks per rank).
    """

    kvp: int = 1
    tpa: int = 1
    tpf: int | None = None
    ep: int = 1
    hopb: int = 1
    stripe: int | None = None

    def __post_init__(self) -> None:
        for name in _INT_FIELDS:
            value = getattr(self, name)
            if value is None and name in ("tpf", "stripe"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise HelixConfigError(
                    f"helix option {name}={value!r} must be a positive integer "
                    f"(e.g. {name}=1)"
                )
            if value > _LIMITS[name]:
                raise HelixConfigError(f"helix option {name}={value} is above its limit {_LIMITS[name]}"
                                       + (" (a HOP-B micro-batch holds at least one request of a decode batch)"
                                          if name == "hopb" else "") + f"; e.g. {name}=2")
        if self.tpf is None:
            if self.world_size % self.ep:
                raise HelixConfigError(
                    f"ep={self.ep} does not divide kvp*tpa={self.world_size}, so tpf "
                    f"cannot default to kvp*tpa/ep; pick ep among "
                    f"{_divisors(self.world_size)} or give tpf explicitly"
                )
            object.__setattr__(self, "tpf", self.world_size // self.ep)
        if self.tpf * self.ep != self.world_size:
            raise HelixConfigError(
                f"tpf*ep must equal kvp*tpa (the same ranks run attention and FFN): "
                f"tpf={self.tpf} * ep={self.ep} = {self.tpf * self.ep} but "
                f"kvp={self.kvp} * tpa={self.tpa} = {self.world_size}; e.g. "
                f"tpf={self.world_size // self.ep if self.world_size % self.ep == 0 else self.world_size},"
                f"ep={self.ep if self.world_size % self.ep == 0 else 1}"
            )

    # ----------------------------------------------------------------- spellings
    @classmethod
    def from_dict(cls, options: Mapping[str, Any]) -> "HelixConfig":
        """Build from a mapping (``additional_config["helix"]``, parsed YAML or CLI)."""
        if not isinstance(options, Mapping):
            raise HelixConfigError(
                f"helix options must be a mapping like {{'kvp': 2, 'tpa': 1}}, got "
                f"{type(options).__name__}"
            )
        unknown = sorted(set(options) - set(_INT_FIELDS))
        if unknown:
            raise HelixConfigError(
                f"unknown helix option(s) {unknown}; valid options are "
                f"{', '.join(_INT_FIELDS)}"
            )
        return cls(**{key: options[key] for key in options})

    @classmethod
    def parse(cls, text: str) -> "HelixConfig":
        """Parse the ``--helix`` string ``kvp=4,tpa=2,tpf=8,ep=1,hopb=2`` (an empty one is refused, not
        read as the default layout)."""
        if not text.strip():
            raise HelixConfigError("--helix needs a layout such as kvp=2,tpa=1 (or off for plain vLLM)")
        options: dict[str, int] = {}
        for item in (part.strip() for part in text.split(",")):
            key, sep, raw = item.partition("=")
            key = key.strip()
            if not sep or not raw.strip():
                hint = " (options are separated by commas, without spaces)" if re.search(r"\s", item) else ""
                raise HelixConfigError(
                    f"cannot parse helix option {item!r}: expected key=value, e.g. "
                    f"--helix kvp=2,tpa=1{hint}"
                )
            if key in options:
                raise HelixConfigError(f"helix option {key!r} is given twice in {text!r}")
            if re.search(r"\s", raw.strip()):
                raise HelixConfigError(f"cannot parse helix option {item!r}: options are separated by commas, "
                                       f"e.g. --helix kvp=2,tpa=1")
            if key in _INT_FIELDS:
                options[key] = _strict_int(key, raw.strip())
            else:
                options[key] = raw.strip()  # type: ignore[assignment]  # from_dict names the unknown key
        return cls.from_dict(options)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "HelixConfig":
        """Load a preset; the file holds the options at top level or under ``helix:``."""
        return load_preset(path)[0]


    def to_dict(self) -> dict[str, int]:
        """The dict form (round-trips through :meth:`from_dict`); unset stripe is omitted."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    def to_cli(self) -> str:
        """The ``--helix`` string form (round-trips through :meth:`parse`)."""
        return ",".join(f"{k}={v}" for k, v in self.to_dict().items())

    # ---------------------------------------------------------------- derived
    @property
    def world_size(self) -> int:
        """Ranks in one Helix instance: ``kvp * tpa`` (== ``tpf * ep``)."""
        return self.kvp * self.tpa

    def stripe_for(self, block_size: int) -> int:
        """Tokens per stripe for a KV cache of ``block_size``-token blocks."""
        return block_size if self.stripe is None else self.stripe

    # -------------------------------------------------------------- validation
    def validate(self, world_size: int, model: ModelShape, max_world_size: int | None = None) -> "HelixConfig":
        """Check this layout against the workers and the model; return self.

        Raises :class:`HelixConfigError` for the first violated constraint, with
        the values and a working alternative. ``max_world_size`` (e.g. the cores of
        a CPU machine) bounds the alternatives suggested, so every suggestion can start.
        """
        if self.world_size != world_size:
            raise HelixConfigError(
                f"kvp*tpa must equal the number of workers: kvp={self.kvp} * "
                f"tpa={self.tpa} = {self.world_size} but there are {world_size} workers; "
                f"e.g. kvp={world_size // self.tpa if world_size % self.tpa == 0 else world_size},"
                f"tpa={self.tpa if world_size % self.tpa == 0 else 1}"
            )
        if model.is_mla and self.tpa != 1:
            raise HelixConfigError(
                f"MLA models have one latent KV head, so tpa must be 1 (got tpa={self.tpa}); "
                f"use kvp={world_size},tpa=1"
            )
        if model.num_kv_heads % self.tpa:
            valid = [d for d in _divisors(model.num_kv_heads) if world_size % d == 0]
            qualifier = "exceeds" if self.tpa > model.num_kv_heads else "does not divide"
            raise HelixConfigError(
                f"tpa={self.tpa} {qualifier} the model's {model.num_kv_heads} KV heads "
                f"(tpa must divide the KV heads); use tpa in {valid}, e.g. "
                f"kvp={world_size // max(valid)},tpa={max(valid)}"
            )
        if model.num_q_heads % world_size:
            raise HelixConfigError(
                f"the model's {model.num_q_heads} query heads must split evenly over "
                f"kvp*tpa={world_size} ranks after the all-to-all; use a world size in "
                f"{[d for d in _divisors(model.num_q_heads) if 1 < d <= (max_world_size or d)] or [1]}"
            )
        if model.num_experts:
            if model.num_experts % self.ep:
                valid = [d for d in _divisors(model.num_experts) if world_size % d == 0]
                raise HelixConfigError(
                    f"ep={self.ep} does not divide the model's {model.num_experts} experts; "
                    f"use ep in {valid}"
                )
            if model.moe_intermediate_size and model.moe_intermediate_size % self.tpf:
                raise HelixConfigError(
                    f"tpf={self.tpf} does not divide the expert intermediate size "
                    f"{model.moe_intermediate_size}; use a larger ep so tpf=kvp*tpa/ep divides it"
                )
        elif self.ep != 1:
            raise HelixConfigError(
                f"ep={self.ep} needs a mixture-of-experts model, but this model is dense; "
                f"use ep=1,tpf={world_size}"
            )
        stripe = self.stripe_for(model.block_size)
        if model.block_size % stripe:
            raise HelixConfigError(
                f"stripe={stripe} must divide the KV block size {model.block_size} "
                f"(a block then holds whole stripes of one rank); use stripe in "
                f"{_divisors(model.block_size)}"
            )
        return self


def load_preset(path: str | Path) -> tuple[HelixConfig, str | None]:
    """A preset's layout and the platform it names (``platform:`` beside ``helix:``, e.g. ``cpu:2`` or
    ``cuda:9.0``: where it is meant to run, what ``serve --helix-config FILE --check`` checks it for)."""
    path = Path(path)
    try:
        data = yaml.load(path.read_text(), Loader=_StrictYAMLLoader)  # noqa: S506  # a SafeLoader subclass
    except FileNotFoundError:
        raise HelixConfigError(f"helix config file {str(path)!r} does not exist") from None
    except yaml.YAMLError as err:
        raise HelixConfigError(f"helix config file {str(path)!r} is not valid YAML: {err}") from None
    except HelixConfigError as err:
        raise HelixConfigError(f"helix config file {str(path)!r}: {err}") from None
    platform = None
    if isinstance(data, Mapping) and "helix" in data:
        beside = sorted(str(key) for key in data if key not in ("helix", "platform"))
        if beside:
            placed = [k for k in beside if k in _INT_FIELDS]
            where = (f"Helix options belong under 'helix:' (e.g. helix: {{{placed[0]}: "
                     f"{data[placed[0]]}}})" if placed else f"valid keys are 'helix', 'platform' and, under "
                     f"'helix', {', '.join(_INT_FIELDS)}")
            raise HelixConfigError(
                f"helix config file {str(path)!r} has key(s) {beside} beside 'helix:', which would be "
                f"ignored; {where}"
            )
        platform = data.get("platform")
        if platform is not None and not isinstance(platform, str):
            raise HelixConfigError(f"helix config file {str(path)!r}: platform {platform!r} must be a string "
                                   "such as cpu:2 or cuda:9.0")
        data = data["helix"]
    return HelixConfig.from_dict(data if data is not None else {}), platform


ADDITIONAL_CONFIG_KEY = "helix"  # where vLLM's ``additional_config`` carries the layout


def near_miss_key(additional_config: Mapping[str, Any]) -> str | None:
    """A key of ``additional_config`` that looks like a misspelt ``helix`` (``Helix``, ``helx``), if any:
    worth a warning, not a refusal, since other plugins share ``additional_config``."""
    for key in additional_config:
        if (isinstance(key, str) and key != ADDITIONAL_CONFIG_KEY
                and difflib.get_close_matches(key.lower(), [ADDITIONAL_CONFIG_KEY], n=1, cutoff=0.75)):
            return key
    return None


def from_additional_config(additional_config: Any) -> HelixConfig | None:
    """The Helix layout asked for in vLLM's ``additional_config`` (dict or JSON string), if any.

    Pure parsing (no vLLM): the engine hook, the worker runtime and the MoE grid
    hook all read the request through this one function. Anything but a JSON object is refused.
    """
    if additional_config is None or additional_config == {} or additional_config == "":
        return None
    if isinstance(additional_config, str):
        try:
            additional_config = json.loads(additional_config)
        except json.JSONDecodeError as err:
            raise HelixConfigError(f"--additional-config is not valid JSON: {err}") from None
    if not isinstance(additional_config, dict):
        raise HelixConfigError(f"--additional-config must be a JSON object such as "
                               f"'{{\"helix\": {{\"kvp\": 2}}}}', got {json.dumps(additional_config)}")
    if ADDITIONAL_CONFIG_KEY not in additional_config:
        return None
    options = additional_config[ADDITIONAL_CONFIG_KEY]
    if isinstance(options, str):
        return HelixConfig.parse(options)
    return HelixConfig.from_dict(options)
