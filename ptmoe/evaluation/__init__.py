"""Portuguese benchmark suites (ASSIN 2, HAREM, LeNER-Br): dataset table, loading, fine-tune-and-evaluate, few-shot."""
