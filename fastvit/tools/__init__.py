"""The tooling behind the command line (``fastvit.cli``), one concern per module.

- ``env``: the environment of a measurement: device, versions, commit, CPU load.
- ``timing``: interleaved timing of contenders and peak memory.
- ``shapes``: attention calls named after the models they come from, their FLOPs, bytes and peaks.
- ``contenders``: what a benchmark group times (attention backends; models vs vit-pytorch and timm).
- ``runner``: planning and running ``fastvit bench`` into one results document.
- ``schema``: that document's schema and validator.
- ``render``: the tables ``fastvit bench`` prints.
- ``check``: ``fastvit check``, every backend against the reference (cases: ``fastvit.attention.testing``).
- ``tune``: ``fastvit tune``, kernel configs and backend orders measured per shape bucket.
"""
