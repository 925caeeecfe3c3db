"""The operators' side of jobflow: what ``jobflow status``, ``jobs``, ``schedule`` and ``dead-letters`` do.

Each module holds one concern: ``amqp`` (every pika call), ``letters`` (reading a dead letter),
``selection`` (filters), ``moves`` (replay and purge), ``status`` (counts), ``timespec`` (delays
and times typed by a person), ``output`` (tables and JSON) and the Click commands in ``cli_*``.
"""
