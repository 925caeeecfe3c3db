"""Every pika call of the runtime: the brokers, the consumer, the ladder and confirmed publishing."""
