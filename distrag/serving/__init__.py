"""Using what was trained: a pipeline saved as one folder (a bundle), loaded again, asked, served.

* :mod:`~distrag.serving.bundle`: the bundle's layout and :func:`~distrag.serving.bundle.write_bundle`;
* :mod:`~distrag.serving.checksums`: sizes and sha256 of its files, the rules a folder from elsewhere must pass
  (no symlink out of it, no pickle, nothing unlisted), and the fingerprint of a base model's files;
* :mod:`~distrag.serving.loader`: :func:`~distrag.serving.loader.load_bundle`, verified, into a ``RAGPipeline``;
* :mod:`~distrag.serving.model_card`: the bundle's README.md;
* :mod:`~distrag.serving.predict`: answers with passages, scored where the questions carry answers;
* :mod:`~distrag.serving.mlflow_model`: the bundle as an MLflow pyfunc model, logged and registered.

Layer: above ``reporting`` (the model card quotes the report's intervals; models are logged through the run's
tracker) and below ``training``, which writes a bundle for every evaluated pipeline
(:meth:`distrag.training.experiment.Experiment.evaluate`). It imports data, models, retrieval and reporting;
training, distributed and cli import it.
"""
