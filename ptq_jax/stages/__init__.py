"""The stages every pipeline is made of, one module each, all with the signature
``(prepared, qstate, key) -> (qstate, report)`` (:mod:`.prepare`): ranges, AdaQuant,
sensitivity and allocation (mixed precision), BN tuning, bias tuning."""
