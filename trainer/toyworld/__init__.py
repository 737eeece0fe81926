"""The toy world: a procedurally drawn world, a toy base model pretrained on it, a judge, and the
concept evaluation that measures what a trainer taught that base (docs/toyworld.md).

- ``world``: the deterministic picture generator (shapes, colours, "a frog", the held-out "sls frog").
- ``pretrain``: the toy base and judge: build, pack, ship, cache; ``model.base: toy`` loads it.
- ``judge``: the classifier that scores pictures.
- ``evaluate``: ``sdtrain eval concept``.
"""
