"""``musicattr report``: a self-contained HTML page to listen to a query beside its attributed tracks."""
from __future__ import annotations

from pathlib import Path

from musicattr.report.baselines import MODES, similarity_scores
from musicattr.report.compare_index import write_compare_report
from musicattr.report.credits import RULES
from musicattr.report.inputs import load_query_inputs
from musicattr.report.media import AUDIO_FORMATS
from musicattr.report.query import ReportOptions, write_query_report


def run_report(out_dir: str, scores: str | None = None, compare: str | None = None, query_audio: str | None = None,
               prompt: str | None = None, store: str | None = None, top_k: int = 10, credit_rule: str = "positive",
               credit_score: str = "score", temperature: float = 1.0, group_by: list[str] | None = None,
               metadata_columns: list[str] | None = None, similarity: str = "auto", audio_encoder: str = "aisfx",
               audio_encoder_checkpoint: str | None = None, audio_format: str = "wav",
               track_spectrograms: bool = True) -> str:
    """Write the report folder (``index.html`` + the audio and images it links, ``credits.csv``); print its page.

    Args:
        out_dir: the report folder (it works offline, with no server: open its index.html).
        scores: one query: the out_dir of `musicattr attribute` (or its scores.parquet).
        compare: a set of queries: the out_dir of `musicattr compare`; out_dir gets an index page over the
            queries (methods side by side) and one folder per query.
        query_audio / prompt: the query's audio and prompt (default: found from the scores' run.json, e.g.
            qNNN.wav and queries.json beside the qNNN.query.safetensors that was unlearned).
        store: the latent store (default: the one named in the scores' run.json).
        top_k: training tracks listed with their audio.
        credit_rule: 'positive' (share = tau_i / sum of tau over the credited tracks) or 'softmax' (of
            tau / (temperature * std tau)); credited: tau_i above the noise floor (noise.json's float error).
        credit_score: 'score' (Eq. 1) or 'relative_score' (tau / s) as the credit score.
        group_by: metadata columns to aggregate credit by (e.g. [composer, collection]); credits_by_<col>.csv each.
        metadata_columns: metadata shown per track (default: title, composer, collection, kind, instrument,
            source, planted_group, licence where present).
        similarity: similarity-baseline ranks: 'auto' (a compare run's tables, else cached training
            embeddings), 'compute' (also embed the training set if needed, cached), or 'none'.
        audio_encoder / audio_encoder_checkpoint: the encoder of computed similarity ranks.
        audio_format: audio copied into the folder: wav (16-bit), flac, ogg or mp3.
        track_spectrograms: a small spectrogram under each top-k track's player.
    """
    if (scores is None) == (compare is None):
        raise ValueError("give exactly one of scores (a `musicattr attribute` out_dir) or compare "
                         "(a `musicattr compare` out_dir)")
    if credit_rule not in RULES:
        raise ValueError(f"unknown credit_rule {credit_rule!r}; fix: choose one of {', '.join(RULES)}")
    if audio_format not in AUDIO_FORMATS:
        raise ValueError(f"unknown audio_format {audio_format!r}; fix: choose one of {', '.join(AUDIO_FORMATS)}")
    if similarity not in MODES:
        raise ValueError(f"unknown similarity {similarity!r}; fix: choose one of {', '.join(MODES)}")
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    opt = ReportOptions(top_k, credit_rule, credit_score, temperature, list(group_by or []), metadata_columns,
                        audio_format, track_spectrograms)
    if compare is not None:
        index = write_compare_report(compare, out_dir, opt, store, similarity, audio_encoder, audio_encoder_checkpoint)
    else:
        q = load_query_inputs(scores, query_audio, prompt, store)
        index = write_query_report(q, out_dir, similarity_scores(q, similarity, audio_encoder,
                                                                 audio_encoder_checkpoint), opt)
    print(Path(index))  # the stage's one line of output: the page to open
    return str(index)
