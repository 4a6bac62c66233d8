//! What a job's data stream to the coordinator (a backup's upload, a
//! restore's download) does when it breaks: which statuses are a break and
//! which a refusal ([`StreamError::of`]), and the wait for the coordinator
//! to be reachable again ([`Link`], [`Resuming`]): the newest session's
//! channel from [`RunningJobs::channels`], a try every [`RESUME_RETRY`] at
//! most, up to [`REATTACH_LIMIT`], ended at once by the job's cancel.
//! What a resumed stream sends again is each stream's own business.

use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::jobs::{CurrentChannel, JobEnd, RunningJobs};

/// How long a broken stream waits for the coordinator to be reachable
/// again (a little more than the coordinator's default
/// `jobs.reattach_timeout`, after which it fails the attempt anyway).
pub const REATTACH_LIMIT: Duration = Duration::from_secs(11 * 60);
/// Between two tries to resume.
pub const RESUME_RETRY: Duration = Duration::from_secs(2);

/// Why a step of a job's stream failed.
#[derive(Debug)]
pub enum StreamError {
    /// The stream broke: resume.
    Broken(String),
    /// The coordinator refused: final.
    Refused(String),
}

impl From<StreamError> for JobEnd {
    fn from(error: StreamError) -> Self {
        match error {
            StreamError::Broken(message) => JobEnd::Interrupted(message),
            StreamError::Refused(message) => JobEnd::Failed(message),
        }
    }
}

impl StreamError {
    /// A status that ended a stream (or refused to open one), after `what`.
    /// The coordinator's answers about the job or the data are final; the
    /// rest (unavailable, unknown: a reset connection, cancelled, a
    /// deadline) is a break.
    pub fn of(status: &tonic::Status, what: &str) -> StreamError {
        let message = format!("{what}: {}", status.message());
        match status.code() {
            tonic::Code::InvalidArgument
            | tonic::Code::PermissionDenied
            | tonic::Code::Unauthenticated
            | tonic::Code::NotFound
            | tonic::Code::FailedPrecondition
            | tonic::Code::Aborted
            | tonic::Code::Internal
            | tonic::Code::ResourceExhausted
            | tonic::Code::OutOfRange
            // A chunk missing or altered in the repository: no stream
            // brings it back.
            | tonic::Code::DataLoss => StreamError::Refused(message),
            _ => StreamError::Broken(message),
        }
    }
}

/// A job's way to the coordinator: the channel in use, and the sessions'
/// newer ones.
pub struct Link {
    /// The job's token: a cancel or a shutdown stops a resume too.
    cancel: CancellationToken,
    channels: watch::Receiver<CurrentChannel>,
    /// The channel in use and its number.
    channel: (u64, Channel),
}

impl Link {
    /// Starts on `channel`, the current session's.
    pub fn new(jobs: &RunningJobs, channel: Channel, cancel: CancellationToken) -> Link {
        let channels = jobs.channels();
        let generation = channels.borrow().0;
        Link {
            cancel,
            channels,
            channel: (generation, channel),
        }
    }

    /// The channel to open a stream on.
    pub fn channel(&self) -> Channel {
        self.channel.1.clone()
    }

    /// Starts resuming a stream (`what`: "upload", "download") that broke
    /// for `reason`; the tries end [`REATTACH_LIMIT`] from now.
    pub fn resuming(&self, what: &'static str, reason: &str) -> Resuming {
        tracing::warn!(%reason, "the {what} stream broke; resuming when the coordinator is back");
        Resuming {
            what,
            deadline: Instant::now() + REATTACH_LIMIT,
            last: reason.to_string(),
        }
    }
}

/// The tries to resume one broken stream.
pub struct Resuming {
    what: &'static str,
    deadline: Instant,
    /// Why the last try (or the stream) failed.
    last: String,
}

impl Resuming {
    /// Waits for the next try: a newer session's channel if one comes
    /// (then `link` uses it), else a pause of [`RESUME_RETRY`]. Past
    /// [`REATTACH_LIMIT`] a break; cancelled, a refusal.
    pub async fn next_try(&mut self, link: &mut Link) -> Result<(), StreamError> {
        if Instant::now() >= self.deadline {
            return Err(StreamError::Broken(format!(
                "the {} could not resume within {}: {}",
                self.what,
                humantime::format_duration(REATTACH_LIMIT),
                self.last
            )));
        }
        tokio::select! {
            () = link.cancel.cancelled() => {
                return Err(StreamError::Refused(format!("the {} was stopped", self.what)));
            }
            _ = tokio::time::timeout(RESUME_RETRY, link.channels.changed()) => {}
        }
        let (generation, channel) = link.channels.borrow().clone();
        if let Some(channel) = channel
            && generation != link.channel.0
        {
            link.channel = (generation, channel);
        }
        Ok(())
    }

    /// A try failed: a break is tried again (`Ok`), a refusal is final.
    pub fn failed(&mut self, error: StreamError) -> Result<(), StreamError> {
        match error {
            StreamError::Broken(reason) => {
                self.last = reason;
                Ok(())
            }
            refused => Err(refused),
        }
    }

    /// A try was refused for a reason that passes (the coordinator has not
    /// yet seen the old stream die): tried again.
    pub fn try_again(&mut self, reason: String) {
        self.last = reason;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_coordinators_answers_are_final_and_a_lost_connection_is_not() {
        let cases = [
            (tonic::Code::Unavailable, false),
            (tonic::Code::Unknown, false),
            (tonic::Code::Cancelled, false),
            (tonic::Code::DeadlineExceeded, false),
            (tonic::Code::PermissionDenied, true),
            (tonic::Code::Aborted, true),
            (tonic::Code::InvalidArgument, true),
            (tonic::Code::DataLoss, true),
        ];
        for (code, final_answer) in cases {
            let error = StreamError::of(&tonic::Status::new(code, "why"), "the upload");
            match error {
                StreamError::Refused(message) => {
                    assert!(final_answer, "{code:?} is a break");
                    assert_eq!(message, "the upload: why");
                }
                StreamError::Broken(message) => {
                    assert!(!final_answer, "{code:?} is final");
                    assert_eq!(message, "the upload: why");
                }
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_resume_takes_the_newest_channel_stops_on_cancel_and_gives_up_in_time() {
        let lazy = || tonic::transport::Endpoint::from_static("http://127.0.0.1:1").connect_lazy();
        let jobs = RunningJobs::default();
        let cancel = CancellationToken::new();
        let mut link = Link::new(&jobs, lazy(), cancel.clone());
        assert_eq!(link.channel.0, 0);

        let started = Instant::now();
        let mut resuming = link.resuming("download", "connection reset");
        // A new session: taken at once, without the pause.
        jobs.set_channel(lazy());
        resuming.next_try(&mut link).await.unwrap();
        assert_eq!(link.channel.0, 1);
        assert_eq!(started.elapsed(), Duration::ZERO);
        // No new session: a try every RESUME_RETRY, until the limit.
        let mut tries = 1;
        let gave_up = loop {
            match resuming.next_try(&mut link).await {
                Ok(()) => {
                    tries += 1;
                    resuming
                        .failed(StreamError::Broken("still unreachable".into()))
                        .unwrap();
                }
                Err(StreamError::Broken(message)) => break message,
                Err(StreamError::Refused(message)) => panic!("refused: {message}"),
            }
        };
        assert_eq!(
            gave_up,
            "the download could not resume within 11m: still unreachable"
        );
        assert!(started.elapsed() >= REATTACH_LIMIT);
        assert_eq!(
            tries,
            1 + REATTACH_LIMIT.as_secs() / RESUME_RETRY.as_secs(),
            "one try every {RESUME_RETRY:?}"
        );
        // A refusal is final.
        let mut resuming = link.resuming("download", "connection reset");
        assert!(matches!(
            resuming.failed(StreamError::Refused("not running".into())),
            Err(StreamError::Refused(_))
        ));
        // A cancel ends the wait at once.
        cancel.cancel();
        let waiting = Instant::now();
        let Err(StreamError::Refused(stopped)) = resuming.next_try(&mut link).await else {
            panic!("a cancelled resume goes on")
        };
        assert_eq!(stopped, "the download was stopped");
        assert_eq!(waiting.elapsed(), Duration::ZERO);
    }
}
