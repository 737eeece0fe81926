"""``sdtrain lora``: the adapter tools kohya users run after training (docs/tools.md).

- ``inspect``: what an adapter file holds, for which model, and what is wrong with it;
- ``resize``: a LoRA/LoCon/DoRA at a lower rank, fixed or chosen per module from its singular values;
- ``extract``: a LoRA from a fine-tuned model and its base;
- ``merge``: adapters into a base model (a whole model), or several adapters into one.

``files.py`` reads and writes adapter files, ``lowrank.py`` holds the linear algebra they share.
"""
