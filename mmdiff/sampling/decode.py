"""One decode configuration: sampler, cache, token pruning / layer skipping and test-time search.

Every entry point that decodes — ``model.generate``, the search, captioning, ``mmdiff eval``, the
demo, the lmms-eval plugin and the benches — takes one :class:`DecodeConfig`. Its fields carry
their help, choices and ranges (:func:`~mmdiff.options.setting`), from which the flags, demo
controls and plugin arguments are derived (:meth:`DecodeConfig.options`), so a new option is one
field. Values are checked on construction.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..io import JsonConfig
from ..options import Option, check_settings, options_of, setting
from .denoisers import CACHES
from .pruning import PruningConfig
from .rules import REMASKING
from .sampler import SamplerConfig

#: names of the search strategies and verifiers of :mod:`mmdiff.search` (a test checks they match
#: its registries; the names live here so that this layer validates them without importing the search)
SEARCH_STRATEGIES: tuple[str, ...] = ("best_of_n", "hierarchical", "none")
VERIFIER_NAMES: tuple[str, ...] = ("elbo", "elbo_yesno", "yesno")


@dataclass(frozen=True)
class SearchConfig(JsonConfig):
    """Every knob of the test-time search (:mod:`mmdiff.search`, dMLLM-TTS). Saved with evaluation
    results next to the sampler's."""

    strategy: str = setting("none", "test-time search: none = plain decoding, best_of_n, hierarchical",
                            choices=SEARCH_STRATEGIES, key="search", noun="search strategy")
    candidates: int = setting(8, "N trajectories explored (candidate 0 is the plain decode)", low=1, widget_max=16)
    refine: int = setting(1, "T refinement rounds of the best survivor, hierarchical only", low=0, widget_max=8)
    verifier: str = setting("elbo", "candidate score: elbo = the model's ELBO, yesno = its P(yes) to 'is that "
                                    "right?', elbo_yesno = both", choices=VERIFIER_NAMES)
    keep: float = setting(0.5, "fraction of the candidates kept at each checkpoint (successive halving)",
                          low=0.0, high=1.0, low_open=True)
    checkpoints: tuple[float, ...] = setting((0.5,), "increasing fractions of the steps where partial canvases "
                                                     "are scored", low=0.0, high=1.0, low_open=True, high_open=True)
    lookahead: bool = setting(True, "score a partial canvas with its masks filled by the model's current prediction")
    temperature: float = setting(1.0, "temperature of explored trajectories and refinements", low=0.0,
                                 key="search_temperature", widget_max=2.0)
    remasking: tuple[str, ...] = setting(("low_confidence", "margin", "entropy"), "remasking orders cycled over "
                                         "explored trajectories", choices=REMASKING.names, key="search_remasking",
                                         noun="remasking rule")
    elbo_samples: int = setting(2, "K masks per candidate of the ELBO verifier", low=1, widget_max=8)
    refine_ratio: float = setting(0.25, "fraction of the canvas remasked per refinement round", low=0.0, high=1.0,
                                  low_open=True)
    seed: int = setting(0, "seed of the search (exploration noise, ELBO masks, refinements)", key="search_seed")

    def __post_init__(self) -> None:
        object.__setattr__(self, "checkpoints", tuple(self.checkpoints))
        object.__setattr__(self, "remasking", tuple(self.remasking))
        if (any(not isinstance(f, (int, float)) or not 0 < f < 1 for f in self.checkpoints)
                or list(self.checkpoints) != sorted(set(self.checkpoints))):
            raise ValueError(f"checkpoints must be increasing fractions in (0, 1), got {list(self.checkpoints)}")
        check_settings(self)
        if not self.remasking:
            raise ValueError("remasking needs at least one remasking rule")

    @property
    def active(self) -> bool:
        """Whether a search runs (strategy other than ``none``)."""
        return self.strategy != "none"


@dataclass(frozen=True)
class DecodeConfig(JsonConfig):
    """How to decode: the sampler's settings, the cache strategy, token pruning / layer skipping and
    the test-time search, travelling together.

    Args:
        sampler: the one sampler loop's settings.
        cache: the denoiser (``CACHES``): ``none``, ``prefix`` (exact prompt KV cache for prefix-LM
            models), ``block`` / ``dual`` (Fast-dLLM's approximate block-wise caches).
        pruning: visual-token pruning and layer skipping.
        search: test-time search (strategy ``none`` = plain decoding).

    A section given as None takes its defaults.
    """

    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    cache: str = setting("none", "KV cache: none; prefix = exact prompt cache for prefix-LM models; block / dual "
                                 "= Fast-dLLM's approximate block-wise prefix / dual cache, refreshed at each block "
                                 "start", choices=CACHES.names)
    pruning: PruningConfig = field(default_factory=PruningConfig)
    search: SearchConfig = field(default_factory=SearchConfig)

    def __post_init__(self) -> None:
        check_settings(self)
        for name, cls in (("sampler", SamplerConfig), ("pruning", PruningConfig), ("search", SearchConfig)):
            if getattr(self, name) is None:  # None = the section's defaults
                object.__setattr__(self, name, cls())
            if not isinstance(getattr(self, name), cls):
                raise TypeError(f"DecodeConfig.{name} must be a {cls.__name__}, got {type(getattr(self, name)).__name__}")

    # -- plain values (to_dict: {"sampler": {...}, "cache": ..., "pruning": {...}, "search": {...}}) ---
    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "DecodeConfig":
        """Inverse of :meth:`to_dict`; missing sections take their defaults, unknown keys are refused."""
        unknown = sorted(set(data) - {"sampler", "cache", "pruning", "search"})
        if unknown:
            raise ValueError(f"decode config: unknown sections {unknown}; known: cache, pruning, sampler, search")
        return cls(sampler=SamplerConfig.from_dict(data.get("sampler", {})), cache=data.get("cache", "none"),
                   pruning=PruningConfig.from_dict(data.get("pruning", {})),
                   search=SearchConfig.from_dict(data.get("search", {})))

    def replace(self, **sections: Any) -> "DecodeConfig":
        """A copy with whole sections replaced (``decode.replace(sampler=...)``)."""
        return dataclasses.replace(self, **sections)

    # -- flat options: flags, demo controls, plugin arguments -----------------------------------------
    @staticmethod
    def options() -> list[Option]:
        """One :class:`~mmdiff.options.Option` per setting, in section order (sampler, cache, pruning,
        search); ``key`` is the flat name shared by the flag, the demo control and the plugin argument."""
        return options_of(DecodeConfig)

    def values(self) -> dict[str, Any]:
        """This configuration as ``{option key: value}`` (the inverse of :meth:`with_values`)."""
        return {o.key: getattr(getattr(self, o.section) if o.section else self, o.name) for o in self.options()}

    def with_values(self, values: Mapping[str, Any], *, parse: bool = False) -> "DecodeConfig":
        """A copy with the options named by ``values`` ({option key: value}) changed.

        Args:
            values: option keys (see :meth:`options`) to new values.
            parse: values are text or page values (``"0.5"``, ``"3,4"``, ``"None"``) to convert first.

        Raises:
            ValueError: an unknown key (the known ones are listed) or a bad value (named).
        """
        by_key = {o.key: o for o in self.options()}
        unknown = sorted(set(values) - set(by_key))
        if unknown:
            raise ValueError(f"unknown decode option(s) {unknown}; known: {', '.join(sorted(by_key))}")
        changes: dict[str, dict[str, Any]] = {}
        for key, value in values.items():
            o = by_key[key]
            changes.setdefault(o.section, {})[o.name] = o.parse(value) if parse else value
        top = changes.pop("", {})
        sections = {s: dataclasses.replace(getattr(self, s), **c) for s, c in changes.items()}
        return dataclasses.replace(self, **top, **sections)
