"""The ``musicattr`` command: one subcommand per stage of the flow (see README), listed in ``STAGES``.

Lightning stages are LightningCLI programs (``--config``, ``--print_config``, ``--model.*``, ``--data.*``,
``--trainer.*``); function stages are jsonargparse programs over one function, with the same ``--config``
handling and, where the function scores with Lightning, the same ``--trainer.*`` options.

The run root: stage configs write the paths of a run as ``${run_root}/...``. Its value comes from
``--run_root DIR`` (any stage), else the environment variable ``MUSICATTR_RUN_ROOT``, else the
``run_root`` of ``run.yaml`` in the folder of the ``--config`` file (``configs/demo/run.yaml``: runs/demo).
It is substituted into config files and command-line values before parsing, so ``--print_config`` shows
the resolved paths.
"""
from __future__ import annotations

import importlib
import logging
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

RUN_ROOT_ENV = "MUSICATTR_RUN_ROOT"
WANDB_DIR_ENV = "MUSICATTR_WANDB_DIR"  # where wandb_logger writes, set to the run root by every stage
PLACEHOLDER = "${run_root}"
PARSER_MODE = "musicattr"

FIT = {"logger": {"class_path": "musicattr.wandb_logger.OfflineWandbLogger"}}
PREDICT = {"use_distributed_sampler": False, "logger": False, "enable_progress_bar": True}
PREDICT_GRAD = {**PREDICT, "inference_mode": False}  # per-item gradients (Fisher, relative scores)
RETRAIN = {"accelerator": "cpu", "devices": 1}  # the hardware of each retrain; the recipe sets the rest


@dataclass(frozen=True)
class Stage:
    """A subcommand: ``target`` ("module:attribute") is a LightningModule (``subcommand`` "fit" or "predict",
    with the LightningDataModule ``data``) or a function. ``trainer``: Trainer defaults; a function stage
    with them also takes ``--trainer.*`` and receives them as ``trainer=dict``."""

    help: str
    target: str
    subcommand: str | None = None
    data: str | None = None
    trainer: dict | None = field(default=None, hash=False)


STAGES = {
    "corpus": Stage("render the embedded music corpus (music21 -> MIDI -> synthesizer) into an audio folder",
                    "musicattr.data.corpus:render_corpus"),
    "autoencoder": Stage("train the Oobleck VAE (stable-audio-tools AudioAutoencoder) on an audio folder",
                         "musicattr.models.autoencoder_module:AutoencoderModule", "fit",
                         "musicattr.data.audio_datamodule:AudioCropDataModule", FIT),
    "encode": Stage("encode an audio folder into the latent store (latents, padding, timing, text embeddings)",
                    "musicattr.models.encode:EncodeModule", "predict", None, PREDICT),
    "fit": Stage("pretrain the latent DiT on the latent store -> checkpoint theta0",
                 "musicattr.models.diffusion_module:DiffusionModule", "fit",
                 "musicattr.data.datamodules:LatentDataModule", FIT),
    "fisher": Stage("accumulate the diagonal Fisher of theta0 over the latent store",
                    "musicattr.attribution.fisher:FisherModule", "predict",
                    "musicattr.data.datamodules:StorePredictDataModule", PREDICT_GRAD),
    "generate": Stage("generate audio and query latents from text prompts", "musicattr.models.generate:generate"),
    "ekfac": Stage("fit the EK-FAC factors of theta0 over the latent store (kronfluence): Eq. 2's preconditioner "
                   "(AbU+, unlearn --ekfac)", "musicattr.peers.factors:run_ekfac"),
    "unlearn": Stage("unlearn a query (generated latent or training item) from theta0 (Eq. 2)",
                     "musicattr.attribution.unlearn:run_unlearn"),
    "attribute": Stage("score every training item: tau_i = L(z_i, theta_unlearned) - L(z_i, theta0) (Eq. 1)",
                       "musicattr.attribution.score:ScoringModule", "predict",
                       "musicattr.data.datamodules:StorePredictDataModule", PREDICT_GRAD),
    "index": Stage("build the attribution index: projected preconditioned gradients P (F+lambda)^-1/2 g_i of every "
                   "training item", "musicattr.attribution.index:IndexModule", "predict",
                   "musicattr.data.datamodules:StorePredictDataModule", PREDICT_GRAD),
    "query": Stage("attribute queries against the index in seconds (first-order Eq. 1: <P phi_i, P psi>)",
                   "musicattr.attribution.query:run_query"),
    "evaluate": Stage("self-influence grid search (Table 1) on train-to-train attribution",
                      "musicattr.evaluation.evaluate:run_grid", trainer=PREDICT),
    "compare": Stage("test-to-train comparison with similarity baselines (Figure 1)",
                     "musicattr.evaluation.compare:run_comparison", trainer=PREDICT),
    "adherence": Stage("does the model follow the prompt? planted regeneration (chroma) and group accuracy",
                       "musicattr.evaluation.adherence:run_adherence"),
    "counterfactual": Stage("retrain on subsets of the store: LDS and leave-K-out for every attribution method",
                            "musicattr.counterfactual.campaign:run_counterfactual", trainer=RETRAIN),
    "bank": Stage("the counterfactual ground-truth bank: benchmark model, queries, retrains' query losses (grows, "
                  "resumable)", "musicattr.counterfactual.bank:run_bank", trainer=RETRAIN),
    "benchmark": Stage("any method's scores against the bank: LDS, paired differences, ceiling, leave-K-out, groups",
                       "musicattr.counterfactual.benchmark:run_benchmark"),
    "index-fidelity": Stage("the attribution index against exact unlearning: Spearman and top-k overlap at every k",
                            "musicattr.evaluation.index_fidelity:run_index_fidelity"),
    "report": Stage("an HTML page to listen to a query beside its attributed tracks, with credit shares",
                    "musicattr.report.stage:run_report"),
    "peers": Stage("EK-FAC influence (kronfluence), TRAK / D-TRAK (traker) and EK-FAC unlearning for a compare run's "
                   "queries: one scores table per query and peer", "musicattr.peers.stage:run_peers"),
    "ensemble": Stage("the index averaged over models of several training seeds (refits of the bank's recipe, each "
                      "with its Fisher and index) for a compare run's queries",
                      "musicattr.counterfactual.ensemble_stage:run_ensemble", trainer=RETRAIN),
}
METHOD_MODULES = ("musicattr.peers.methods",)  # register their methods (musicattr.attribution.methods) for every stage


def _load(target: str | None):
    if target is None:
        return None
    module, attr = target.split(":")
    return getattr(importlib.import_module(module), attr)


# ---------------------------------------------------------------------------------------------- run root
def _option(argv: list[str], name: str) -> str | None:
    """The value of ``--name VALUE`` / ``--name=VALUE`` in argv (the first), or None."""
    for i, a in enumerate(argv):
        if a == f"--{name}" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(f"--{name}="):
            return a.split("=", 1)[1]
    return None


def resolve_run_root(argv: list[str]) -> str | None:
    """``--run_root``, else $MUSICATTR_RUN_ROOT, else ``run_root`` of ``run.yaml`` beside the ``--config`` file."""
    root = _option(argv, "run_root") or os.environ.get(RUN_ROOT_ENV)
    config = _option(argv, "config")
    if not root and config and (Path(config).parent / "run.yaml").is_file():
        import yaml

        root = (yaml.safe_load((Path(config).parent / "run.yaml").read_text()) or {}).get("run_root")
    return str(root) if root else None


def with_run_root(argv: list[str]) -> tuple[list[str], str | None]:
    """Install the ``${run_root}`` substitution for config files; return argv with it substituted, and the root."""
    from jsonargparse import get_loader, set_loader

    root = resolve_run_root(argv)
    config = _option(argv, "config")
    texts = [*argv, Path(config).read_text() if config and Path(config).is_file() else ""]
    if root is None and any(PLACEHOLDER in t for t in texts):
        raise SystemExit(f"musicattr: the config uses {PLACEHOLDER} but no run root is set; fix: pass --run_root DIR, "
                         f"set {RUN_ROOT_ENV}, or put 'run_root: DIR' in run.yaml beside the config file")
    yaml_loader = get_loader("yaml")
    set_loader(PARSER_MODE, lambda text: yaml_loader(text.replace(PLACEHOLDER, root) if root else text))
    return ([a.replace(PLACEHOLDER, root) for a in argv] if root else argv), root


# ---------------------------------------------------------------------------------------------- stages
RUN_ROOT_HELP = f"the run root, substituted for {PLACEHOLDER} in the config (default: ${RUN_ROOT_ENV}, or run.yaml)"


def _lightning(name: str, stage: Stage, argv: list[str], root: str | None) -> None:
    from lightning.pytorch.cli import LightningCLI

    class CLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            parser.add_argument("--run_root", default=root, help=RUN_ROOT_HELP)

    CLI(_load(stage.target), _load(stage.data), args=[stage.subcommand, *argv], trainer_defaults=stage.trainer,
        save_config_kwargs={"overwrite": True}, auto_configure_optimizers=False,
        parser_kwargs={"parser_mode": PARSER_MODE,
                       stage.subcommand: {"prog": f"musicattr {name}", "parser_mode": PARSER_MODE}})


def _function(name: str, stage: Stage, argv: list[str], root: str | None) -> None:
    from jsonargparse import ActionConfigFile, ArgumentParser

    fn = _load(stage.target)
    parser = ArgumentParser(prog=f"musicattr {name}", description=stage.help, parser_mode=PARSER_MODE)
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_argument("--run_root", default=root, help=RUN_ROOT_HELP)
    parser.add_function_arguments(fn, skip={"trainer"} if stage.trainer is not None else None)
    if stage.trainer is not None:
        import lightning as L

        parser.add_class_arguments(L.Trainer, "trainer", instantiate=False, fail_untyped=False, sub_configs=True)
        parser.set_defaults({f"trainer.{k}": v for k, v in stage.trainer.items()})
    cfg = parser.instantiate(parser.parse_args(argv)).as_dict()
    fn(**{k: v for k, v in cfg.items() if k not in ("config", "__path__", "run_root")})


def run(name: str, argv: list[str]) -> None:
    stage = STAGES[name]
    for module in METHOD_MODULES:
        importlib.import_module(module)
    argv, root = with_run_root(argv)
    if root:  # the wandb runs of this stage live under its run root (<run_root>/wandb)
        os.environ[WANDB_DIR_ENV] = root
    (_lightning if stage.subcommand else _function)(name, stage, argv, root)


def usage() -> str:
    lines = ["usage: musicattr <subcommand> [--config FILE] [--run_root DIR] [options] [--print_config] [--help]", "",
             "Training data attribution by unlearning for text-to-music latent diffusion.", "", "subcommands:"]
    lines += [f"  {k:<12} {v.help}" for k, v in STAGES.items()]
    lines += ["", "Run `musicattr <subcommand> --help` for the options of one stage."]
    return "\n".join(lines)


def install_log_handler() -> None:
    """Show the library's log (progress, warnings, the top-10 table) on stdout."""
    logger = logging.getLogger("musicattr")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    quiet_lightning()


class _LightningNoise(logging.Filter):
    """Drops Lightning's start-up chatter (hardware lines, product tips, seed notices); keeps warnings."""

    NOISE = ("GPU available", "TPU available", "HPU available", "IPU available", "💡 Tip", "Seed set to",
             "LOCAL_RANK", "You are using a CUDA device")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(self.NOISE)


def quiet_lightning() -> None:
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                 "lightning.fabric.utilities.seed", "lightning.pytorch.accelerators.cuda"):
        logging.getLogger(name).addFilter(_LightningNoise())


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("WANDB_SILENT", "true")  # wandb's banner lines; runs still go to runs/wandb
    warnings.filterwarnings("ignore", message=".*pkg_resources is deprecated.*")
    warnings.filterwarnings("ignore", message=".*LightningCLI.s args parameter.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*No seed found.*")
    warnings.filterwarnings("ignore", message=".*exists and is not empty.*")
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return
    name, rest = argv[0], argv[1:]
    if name not in STAGES:
        print(f"musicattr: unknown subcommand {name!r}\n\n{usage()}", file=sys.stderr)
        raise SystemExit(2)
    install_log_handler()
    run(name, rest)


if __name__ == "__main__":
    main()
