"""Test support code that the ``fm`` package does not ship: the BMTrain CPU backend (:mod:`.bmtrain_cpu`) and the
entry script that runs an app on it under torchrun (``worker.py --bmtrain-cpu``)."""
