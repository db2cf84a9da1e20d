"""The experiment harness beside the `ctxjax` library: the reproduction grid (strict YAML in
`configs/grids/`), running and aggregating it, result pages and plots, the base-model builder, and
the benchmarks with their PyTorch reference. Nothing in `ctxjax/` imports from here."""
