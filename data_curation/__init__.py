"""Data curation for self-supervised pretraining, at the embedding level.

Stages (each reads and writes one work directory, is idempotent and resumable): ``embed``,
``calibrate`` (thresholds for this embedding, from planted near-copies), ``dedup`` (copy detection),
``decontaminate`` (drop evaluation look-alikes), ``retrieve`` (images similar to curated query sets),
``cluster`` + ``sample`` (hierarchical k-means and balanced sampling), ``manifest`` (the list
``dinov2-train`` reads), ``report`` (funnel, duplicate groups, contact sheets). See ``data_curation.cli``.

Importing the package is cheap: modules are imported on use, and faiss only inside functions.
"""
