"""The peers in the method registry (``musicattr.attribution.methods``): one registered class each, with its table
under a compare run. Optional (left out with a log line until ``musicattr peers`` has written the tables) and in the
default list of the stages that compare methods. Imported by ``musicattr.cli`` so every stage knows them."""
from __future__ import annotations

from musicattr.attribution.methods import Method, register_method


@register_method
class EKFACInfluence(Method):
    name = "ekfac"
    table = "queries/{query_id}/ekfac/scores.parquet"
    optional = True
    default = True
    description = "EK-FAC influence functions (kronfluence): grad f(q)^T (G + lambda)^-1 grad L(z_i) (musicattr peers)"


@register_method
class TRAK(Method):
    name = "trak"
    table = "queries/{query_id}/trak/scores.parquet"
    optional = True
    default = True
    description = "TRAK (traker, CPU projector), model output: the diffusion loss (musicattr peers)"


@register_method
class DTRAK(Method):
    name = "dtrak"
    table = "queries/{query_id}/dtrak/scores.parquet"
    optional = True
    default = True
    description = "D-TRAK (traker, CPU projector), model output: the squared norm of the prediction (musicattr peers)"


@register_method
class UnlearningEKFAC(Method):
    name = "unlearning-ekfac"
    table = "queries/{query_id}/unlearning-ekfac/scores.parquet"
    optional = True
    default = True
    description = "AbU+: Eq. 2 with the EK-FAC preconditioner, then Eq. 1 (musicattr peers)"
