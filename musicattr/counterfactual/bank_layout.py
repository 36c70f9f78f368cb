"""The bank folder's names and its error, and the few names the bank takes from the layers below (they move as
those layers are refactored: the bank imports them from here only)."""
from __future__ import annotations

import json
import os
import platform

from musicattr.counterfactual.queries import Query

FORMAT = 1
MANIFEST, DESIGN, PLAN, BENCHMARK_MODEL = "manifest.json", "design.json", "plan.csv", "model.ckpt"
QUERIES = "queries"


class BankError(ValueError):
    """A bank that does not fit the store, recipe or settings it is used with."""


def file_fingerprint_at(path) -> str:
    """The content fingerprint of the file at ``path`` (``musicattr.fingerprint``)."""
    from musicattr.fingerprint import file_fingerprint

    return file_fingerprint(str(path))


def query_info(path) -> dict:
    """The record ``musicattr generate`` keeps in a query file's metadata (query_id, caption, audio, ...)."""
    from musicattr.tensor_file import read_metadata

    return json.loads(read_metadata(path)["info"])


def store_metadata(store) -> dict[str, dict]:
    """file_name -> metadata row of the store's audio folder."""
    from musicattr.evaluation.common import read_metadata_rows

    return read_metadata_rows(store)


def planted_copies(store) -> dict[str, str]:
    """file_name of each planted copy -> its original's file_name."""
    from musicattr.evaluation.common import planted_groups

    return planted_groups(store)


def measure_queries(task, checkpoint, queries: list[Query], store: str, seed: int, num_draws: int, mask: bool,
                     device: str) -> dict[str, float]:
    """L(z_q, theta) of each query under the model in ``checkpoint`` (``counterfactual.queries.query_losses``;
    the task is stateless, the model an argument)."""
    from musicattr.counterfactual.queries import query_losses

    return query_losses(task, task.load(str(checkpoint)), queries, store, seed, num_draws, mask, device)


def compare_generation():
    """compare's query generation (reused so that compare on the benchmark model reuses the bank's queries)."""
    from musicattr.evaluation.compare import generated_queries, planted_queries

    return generated_queries, planted_queries


def machine_info() -> dict:
    import torch

    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version()}
