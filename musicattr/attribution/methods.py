"""The method registry: every attribution method by name, with where its scores table lies per query.

A method's answer to a query is a scores table (:mod:`musicattr.attribution.scores_table`) at ``table``
(``{query_id}`` for the query's id; a relative path is under a ``musicattr compare`` run) in the column
``column``. The stages that evaluate methods (``musicattr counterfactual``, ``musicattr benchmark``, the
report's baselines) find them here, so a new method is one registered class

    @register_method
    class EKFACInfluence(Method):
        name = "ekfac"
        table = "queries/{query_id}/ekfac/scores.parquet"
        optional = True
        description = "EK-FAC influence functions (kronfluence)"

and one config entry (``- ekfac`` in a stage's ``methods``). A config entry may also override the table or
column (``{name: "all-against-all[clap]", table: "../figure1-clap/queries/{query_id}/all-against-all.parquet"}``),
or name a table of its own that no class registers. A name ``base[encoder]`` resolves through ``base``
(``all-against-all[aisfx]`` is the registered ``all-against-all`` with the aisfx encoder's tables).
``random`` has no table: uniform scores from a seed (the chance level).
"""
from __future__ import annotations

from pathlib import Path

RANDOM = "random"


class Method:
    """A named scores table per query. Subclasses set the class attributes; instances may override them."""

    name: str = ""
    table: str | None = None
    column: str = "score"
    optional: bool = False       # a missing table leaves the method out (with a log line) instead of stopping
    default: bool = False        # in the default list of the stages that compare methods
    description: str = ""

    def __init__(self, name: str | None = None, table: str | None = None, column: str | None = None,
                 optional: bool | None = None, description: str | None = None):
        for key, value in (("name", name), ("table", table), ("column", column), ("optional", optional),
                           ("description", description)):
            if value is not None:
                setattr(self, key, value)
        self.name, self.column, self.optional = str(self.name), str(self.column), bool(self.optional)

    def path(self, root: str | Path, query_id: str) -> Path:
        """The table of ``query_id`` (relative templates under ``root``, e.g. a compare run)."""
        if self.table is None:
            raise ValueError(f"method {self.name!r} has no table")
        p = Path(self.table.format(query_id=query_id))
        return p if p.is_absolute() else Path(root) / p

    def __eq__(self, other) -> bool:
        return isinstance(other, Method) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def _key(self):
        return self.name, self.table, self.column, self.optional

    def __repr__(self) -> str:
        return f"Method(name={self.name!r}, table={self.table!r}, column={self.column!r}, optional={self.optional})"


REGISTRY: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: register ``cls`` under ``cls.name`` (a name registers once)."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name; fix: set the class attribute name")
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise ValueError(f"method {cls.name!r} is registered twice ({REGISTRY[cls.name].__name__}, {cls.__name__}); "
                         "fix: give the new method another name")
    REGISTRY[cls.name] = cls
    return cls


def registered(name: str) -> type[Method] | None:
    """The class registered under ``name`` or, for ``base[encoder]``, under ``base``; None if neither."""
    return REGISTRY.get(name) or REGISTRY.get(name.partition("[")[0])


def resolve_method(spec: str | dict | Method) -> Method:
    """A method from a config entry: a name, or ``{name, table, column, optional}`` (given keys override the
    registered class's)."""
    if isinstance(spec, Method):
        return spec
    if isinstance(spec, str):
        spec = {"name": spec}
    unknown = set(spec) - {"name", "table", "column", "optional"}
    if "name" not in spec or unknown:
        raise ValueError(f"method {spec}: give name, and optionally table, column and optional (unknown: "
                         f"{sorted(unknown)})")
    name = str(spec["name"])
    cls = registered(name) or Method
    m = cls(name=name, table=spec.get("table"), column=spec.get("column"), optional=spec.get("optional"))
    if m.table is None and m.name != RANDOM:
        known = ", ".join(sorted(REGISTRY))
        raise ValueError(f"method {name!r} is not registered and names no table; fix: use a registered method "
                         f"({known}) or give its scores table per query, e.g. table: "
                         "'queries/{query_id}/<method>/scores.parquet'")
    return m


def resolve_methods(specs: list) -> list[Method]:
    """Methods from a config's list; names must not repeat."""
    methods = [resolve_method(s) for s in specs]
    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        raise ValueError(f"method names repeat in {names}; fix: name each method once")
    return methods


def default_methods(encoder: str = "aisfx") -> list[Method]:
    """The registered methods marked ``default``, similarity methods with ``encoder``'s tables."""
    out = []
    for name, cls in REGISTRY.items():
        if cls.default:
            out.append(cls(name=f"{name}[{encoder}]") if issubclass(cls, SimilarityMethod) else cls())
    return out


# ---------------------------------------------------------------------------------------------- the built-ins
@register_method
class Unlearning(Method):
    name = "unlearning"
    table = "queries/{query_id}/unlearning/scores.parquet"
    default = True
    description = "Eq. 1: tau_i = L(z_i, theta') - L(z_i, theta0), theta' from Eq. 2 (musicattr attribute)"


@register_method
class UnlearningRelative(Unlearning):
    name = "unlearning-relative"
    column = "relative_score"
    description = "Eq. 1 over the item's sensitivity: tau_i / s_i"


@register_method
class Index(Method):
    name = "index"
    table = "queries/{query_id}/index/scores.parquet"
    optional = True
    default = True
    description = "the attribution index: the first order of Eq. 1 through a k-dimensional sketch (musicattr query)"


@register_method
class IndexRelative(Index):
    name = "index-relative"
    column = "relative_score"
    description = "the index's score over the item's sensitivity"


@register_method
class IndexEnsemble(Method):
    name = "index-ensemble"
    table = "queries/{query_id}/index-ensemble/scores.parquet"
    optional = True
    description = ("the index's scores averaged (raw mean) over models of several training seeds, each with its own "
                   "Fisher and index (musicattr ensemble)")


class SimilarityMethod(Method):
    """A similarity baseline; ``name[encoder]`` names the audio encoder of its embeddings."""


@register_method
class AllAgainstAll(SimilarityMethod):
    name = "all-against-all"
    table = "queries/{query_id}/all-against-all.parquet"
    default = True
    description = "max cosine similarity over all pairs of 10 s segments (Section 3.3)"


@register_method
class Average(SimilarityMethod):
    name = "average"
    table = "queries/{query_id}/average.parquet"
    default = True
    description = "cosine similarity of the time-averaged segment embeddings (Section 3.3)"


@register_method
class Random(Method):
    name = RANDOM
    default = True
    description = "uniform scores from a seed: the chance level"
