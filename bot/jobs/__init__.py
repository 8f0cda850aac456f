"""Jobs: the persisted queue between the router and the generation backend.

`queue.GenerationQueue` is the API (enqueue, reset, forget, positions, waiting, dispatch);
`scheduler.FairScheduler` is the fair order as pure logic; `attempt.JobAttempts` runs one attempt
at a job, from the stored conversation to the stored reply.
"""

from bot.jobs.attempt import AttemptOutcome, AttemptPolicy, JobAttempts
from bot.jobs.queue import GenerationQueue
from bot.jobs.scheduler import FairScheduler, QueuedJob

__all__ = ["GenerationQueue", "FairScheduler", "QueuedJob", "JobAttempts", "AttemptPolicy", "AttemptOutcome"]
