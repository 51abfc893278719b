"""The pipeline: SIDs -> CPT -> SFT -> evaluation over one work directory, the demos and ``plum run``.

The top layer of ``plumrec`` below the CLI: it composes :mod:`plumrec.train`,
:mod:`plumrec.retrieval` and :mod:`plumrec.baselines`, which never import it
(nor each other).

- ``config.py``: the run configuration (:data:`DEFAULTS`, :func:`load_run_config`);
- ``workspace.py``: a run's data, split and SID artefacts (:class:`Workspace`), saved models;
- ``stages.py``: the stages ``plum sid | cpt | sft | eval | recommend`` and the SASRec baseline;
- ``demo.py``: ``plum demo`` and ``plum trie-demo``;
- ``run.py``: ``plum run``, the whole pipeline on a dataset directory, with
  ``defaults.py`` (its packaged defaults, ``plumrec/configs/amazon.toml``),
  ``options.py`` (its options), ``plan.py`` (the training budget and steps),
  ``settings.py`` (the resume checks) and ``report.py`` (evaluations and the results table).
"""
from plumrec.pipeline.config import DEFAULTS, load_run_config
from plumrec.pipeline.demo import demo, trie_demo
from plumrec.pipeline.run import run_dataset
from plumrec.pipeline.stages import run_cpt, run_eval, run_recommend, run_sasrec, run_sft, run_sid
from plumrec.pipeline.workspace import Workspace, load_model, save_model

__all__ = ["DEFAULTS", "load_run_config", "Workspace", "load_model", "save_model", "run_sid", "run_cpt", "run_sft",
           "run_sasrec", "run_eval", "run_recommend", "demo", "trie_demo", "run_dataset"]
