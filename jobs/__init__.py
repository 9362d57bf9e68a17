"""The jobs: thin Ray entrypoints around musiclib, one module per job: ``musiclib <job>`` (installed, this
package is ``musiclib.jobs``), or ``python -m jobs.<job>`` from a checkout."""
