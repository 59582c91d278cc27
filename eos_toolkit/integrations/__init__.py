"""The monitor in the frameworks people train with: Lightning, Hugging Face ``Trainer``, TensorBoard.

Each module imports its framework when it is imported, so
``pip install 'eos-toolkit[integrations]'`` (lightning, transformers,
tensorboard) is needed for the one in use, and nothing else needs them:

* :mod:`eos_toolkit.integrations.lightning`: :class:`EoSCallback`, a Lightning ``Callback``;
* :mod:`eos_toolkit.integrations.huggingface`: :class:`EoSTrainerCallback`, a ``TrainerCallback``;
* :mod:`eos_toolkit.integrations.tensorboard`: :class:`TensorBoardSink` for any monitor, and
  :func:`export_records` for records already written (``eos export tensorboard``).

Every one of them runs :class:`eos_toolkit.monitor.EoSMonitor`, so what is
measured, and the record written, are those of ``eos run``.
"""
