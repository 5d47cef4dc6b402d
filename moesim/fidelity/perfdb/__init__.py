"""Measured kernel latencies as recorded-run tables (schema ``moesim.recorded-table/1``).

:mod:`moesim.fidelity.perfdb.table` defines the long-form table (one row per measured latency),
validates it and turns it into Parquet bytes and back; :mod:`moesim.fidelity.perfdb.importer`
builds it from the GPU kernel measurements that NVIDIA's ``aiconfigurator-core``
package ships (``pip install 'moesim[perfdb]'``). Nothing here writes files; the
``moesim perfdb`` command does. See docs/perfdb.md.
"""
