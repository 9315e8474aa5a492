"""qMachina compute core: DBN replay, L3 book, silver grid."""
