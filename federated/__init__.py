"""Federated SH-PEFT on Flower (Message API): sparse-delta FedAvg across sites.

Only glue lives here: the payload codec over the core's :class:`shpeft_monai.SparseMask`
(``pack``/``unpack``/``to_arrays``/``from_arrays``), the mask-agreement rule, the strategy
(:class:`federated.strategy.SparseDeltaFedAvg`), the Flower client and server apps, the simulation
driver (``python -m federated.simulate``) and the deployment launcher (``federated/deploy.py``).
Importing this package needs numpy and flwr only; torch is imported by the modules that train.
"""
