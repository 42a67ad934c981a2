"""Auditing the record: ``duban audit verify`` (the chains, the checkpoints, the read models)
and ``duban audit verify-file`` (a signed export). The rules are in contracts.audit."""
