# ruff: noqa
# fmt: off
# Seed 002's "Basic Usage" example, verbatim below the marker line (tests/compat/test_seed002.py
# checks it against the seed document when that is present). The test changes only its two import
# lines and its redis_url string (to a private test Redis) before running it as a subprocess.
# --- seed 002 Basic Usage ---
import asyncio
from queue_system import QueueConfig, QueueManager, QueueWorker, QueueRetryConfig
from utils import with_timeout, circuit_breaker, retry_with_backoff

# Create shared configuration
config = QueueConfig(redis_url="redis://localhost:6379/0")

# Create queue manager and worker
queue = QueueManager(config=config)
worker = QueueWorker(config=config, max_workers=2, thread_pool_size=20)

# Define async processor (with timeout support)
async def async_processor(data):
    # Process the data asynchronously
    return {"status": "success", "result": data}

# Define sync processor (runs in thread pool without timeout)
def sync_processor(data):
    # Process the data synchronously
    return {"status": "success", "result": data}

# Define callback function
async def on_success(data):
    print(f"Successfully processed: {data['result']}")

# Enqueue operations
queue.enqueue(
    entity={"user_id": "123", "action": "update"},
    processor=async_processor,  # Will execute with timeout
    priority="high",
    on_success=on_success
)

queue.enqueue(
    entity={"order_id": "456", "action": "process"},
    processor=sync_processor,  # Will execute in thread pool without timeout
    priority="normal"
)

# Start the worker
async def main():
    await worker.start()
    try:
        # Keep the worker running
        while True:
            await asyncio.sleep(1)
    except KeyboardInterrupt:
        # Stop the worker on Ctrl+C
        await worker.stop()

if __name__ == "__main__":
    asyncio.run(main())
