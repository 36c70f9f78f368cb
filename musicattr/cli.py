"""The ``musicattr`` command: one subcommand per stage of the flow (see README).

Lightning stages are LightningCLI programs (``--config``, ``--print_config``, ``--trainer.*``);
the others are jsonargparse programs over one function, with the same ``--config`` handling.
"""
from __future__ import annotations

import os
import sys
import warnings

STAGES = {
    "corpus": "render the embedded music corpus (music21 -> MIDI -> synthesizer) into an audio folder",
    "autoencoder": "train the Oobleck VAE (stable-audio-tools AudioAutoencoder) on an audio folder",
    "encode": "encode an audio folder into the latent store (latents, padding, timing, text embeddings)",
    "fit": "pretrain the latent DiT on the latent store -> checkpoint theta0",
    "fisher": "accumulate the diagonal Fisher of theta0 over the latent store",
    "generate": "generate audio and query latents from text prompts",
    "unlearn": "unlearn a query (generated latent or training item) from theta0 (Eq. 2)",
    "attribute": "score every training item: tau_i = L(z_i, theta_unlearned) - L(z_i, theta0) (Eq. 1)",
    "evaluate": "self-influence grid search (Table 1) on train-to-train attribution",
    "compare": "test-to-train comparison with similarity baselines (Figure 1)",
    "report": "an HTML page to listen to a query beside its attributed tracks, with credit shares",
}

PREDICT_DEFAULTS = {"use_distributed_sampler": False, "logger": False, "enable_progress_bar": True}


def _lightning(stage: str, model_class, datamodule_class, argv: list[str], trainer_defaults: dict,
               subcommand: str) -> None:
    from lightning.pytorch.cli import LightningCLI

    LightningCLI(model_class, datamodule_class, args=[subcommand, *argv], trainer_defaults=trainer_defaults,
                 save_config_kwargs={"overwrite": True}, parser_kwargs={subcommand: {"prog": f"musicattr {stage}"}},
                 auto_configure_optimizers=False)


def _function(stage: str, fn, argv: list[str]) -> None:
    from jsonargparse import ArgumentParser, ActionConfigFile

    parser = ArgumentParser(prog=f"musicattr {stage}", description=STAGES[stage])
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_function_arguments(fn)
    cfg = parser.parse_args(argv)
    kwargs = {k: v for k, v in cfg.as_dict().items() if k not in ("config", "__path__")}
    fn(**kwargs)


def run(stage: str, argv: list[str]) -> None:
    fit_defaults = {"logger": {"class_path": "musicattr.wandb_logger.OfflineWandbLogger"}}
    if stage == "corpus":
        from musicattr.data.corpus import render_corpus
        _function(stage, render_corpus, argv)
    elif stage == "autoencoder":
        from musicattr.data.audio_datamodule import AudioCropDataModule
        from musicattr.models.autoencoder_module import AutoencoderModule
        _lightning(stage, AutoencoderModule, AudioCropDataModule, argv, fit_defaults, "fit")
    elif stage == "encode":
        from musicattr.data.encode import EncodeModule
        _lightning(stage, EncodeModule, None, argv, PREDICT_DEFAULTS, "predict")
    elif stage == "fit":
        from musicattr.data.datamodules import LatentDataModule
        from musicattr.models.diffusion_module import DiffusionModule
        _lightning(stage, DiffusionModule, LatentDataModule, argv, fit_defaults, "fit")
    elif stage == "fisher":
        from musicattr.attribution.fisher import FisherPassModule
        _lightning(stage, FisherPassModule, None, argv, {**PREDICT_DEFAULTS, "inference_mode": False}, "predict")
    elif stage == "generate":
        from musicattr.models.generate import generate
        _function(stage, generate, argv)
    elif stage == "unlearn":
        from musicattr.attribution.unlearn import run_unlearn
        _function(stage, run_unlearn, argv)
    elif stage == "attribute":
        from musicattr.attribution.score import ScoringModule
        _lightning(stage, ScoringModule, None, argv, {**PREDICT_DEFAULTS, "inference_mode": False}, "predict")
    elif stage == "evaluate":
        from musicattr.evaluation.self_influence import run_grid
        _function(stage, run_grid, argv)
    elif stage == "compare":
        from musicattr.evaluation.test_to_train import run_comparison
        _function(stage, run_comparison, argv)
    elif stage == "report":
        from musicattr.report.stage import run_report
        _function(stage, run_report, argv)
    else:
        raise KeyError(stage)


def usage() -> str:
    lines = ["usage: musicattr <subcommand> [--config FILE] [options] [--print_config] [--help]", "",
             "Training data attribution by unlearning for text-to-music latent diffusion.", "", "subcommands:"]
    lines += [f"  {k:<12} {v}" for k, v in STAGES.items()]
    lines += ["", "Run `musicattr <subcommand> --help` for the options of one stage."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    warnings.filterwarnings("ignore", message=".*pkg_resources is deprecated.*")
    warnings.filterwarnings("ignore", message=".*LightningCLI.s args parameter.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return
    stage, rest = argv[0], argv[1:]
    if stage not in STAGES:
        print(f"musicattr: unknown subcommand {stage!r}\n\n{usage()}", file=sys.stderr)
        raise SystemExit(2)
    run(stage, rest)


if __name__ == "__main__":
    main()
