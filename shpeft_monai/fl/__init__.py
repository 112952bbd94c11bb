"""Federated SH-PEFT glue on Flower (as ``monai.fl`` is MONAI's): a hospital site trains by running
the bundle (:mod:`.task`), the server agrees on one mask (:mod:`.mask_round`, over the core rule of
:mod:`shpeft_monai.agreement`) and aggregates only the agreed sparse coordinates (:mod:`.strategy`,
with :mod:`.robust` rules and :mod:`.privacy` at the sites). Drivers: :mod:`.simulate`,
:mod:`.deploy` (with the :mod:`.faults` drills). Modules that need ``flwr`` import it themselves;
``robust``, ``privacy`` and ``partition`` are numpy only. See docs/federated.md."""
