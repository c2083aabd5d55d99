"""conveyor: an asyncio-native job queue."""
