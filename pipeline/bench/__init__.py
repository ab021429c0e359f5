"""The `uniformer bench` measurements (data, model, train, gpu): side-by-side figures, never pass/fail
tests. May import any stage."""
