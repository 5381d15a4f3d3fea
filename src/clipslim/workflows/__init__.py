"""End-to-end jobs: load, train, evaluate and write a folder (demo, compare, stages, ...).

A workflow strings library pieces together; the pieces (data, models, train, eval, methods) never do that themselves,
and the command modules in ``clipslim.commands`` only parse arguments and call one workflow.
"""
