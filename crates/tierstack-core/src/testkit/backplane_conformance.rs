//! The one conformance suite of [`Backplane`] behaviour that every backplane runs.
//!
//! A backend crate calls [`backplane_conformance_tests!`](crate::backplane_conformance_tests) in
//! an integration test with an async factory that returns a fresh [`BackplaneHarness`]: three
//! members of one bus (as three instances of a service would hold them), and a
//! [`SubscriptionOutage`] that makes a member's subscription lost and lets it come back. The macro
//! generates one `#[tokio::test]` per case below, so a failure names the behaviour that broke.
//!
//! Every wait is bounded by [`WAIT`]; nothing is ordered by sleeping: a case publishes a marker
//! and waits for it, so "nothing arrived before the marker" is a check, not a guess.

#![expect(
    clippy::missing_panics_doc,
    reason = "every case panics when the backplane misbehaves: that is how a test fails"
)]

use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::backplane::{
    Backplane, BackplaneEvent, BackplaneHub, Invalidation, InvalidationMessage, MAX_MESSAGE_LEN,
    Subscription,
};
use crate::clock::Timestamp;
use crate::error::CacheError;

/// The longest a case waits for one event (a lost subscription noticed, one regained, a message
/// delivered) before it fails.
pub const WAIT: Duration = Duration::from_secs(10);

/// How a backend makes the subscription of one of a harness's members lost, and lets it come
/// back. Members are numbered by their place in [`BackplaneHarness::members`].
#[async_trait]
pub trait SubscriptionOutage: Send + Sync + Debug + 'static {
    /// Makes the subscription of `member` lost, and keeps it lost until
    /// [`restore`](Self::restore) (a member that resubscribes by itself must fail to). The
    /// member itself stays up: only its subscription is lost.
    async fn lose(&self, member: usize);

    /// Lets `member` subscribe again (or makes it, for a bus that resubscribes only when told).
    async fn restore(&self, member: usize);
}

/// Members of one bus under test, and how to make their subscriptions lost.
#[derive(Debug)]
pub struct BackplaneHarness {
    /// The members: at least three, each as one instance of a service would hold it.
    pub members: Vec<Arc<dyn Backplane>>,
    outage: Box<dyn SubscriptionOutage>,
}

impl BackplaneHarness {
    /// A harness over `members` (at least three, of one bus) and `outage`, which loses and
    /// restores the subscription of each.
    pub fn new(members: Vec<Arc<dyn Backplane>>, outage: impl SubscriptionOutage) -> Self {
        assert!(
            members.len() >= 3,
            "a backplane harness needs three members, not {}",
            members.len()
        );
        Self {
            members,
            outage: Box::new(outage),
        }
    }

    /// A subscription to each member, in order.
    fn subscribe_all(&self) -> Vec<Subscription> {
        self.members.iter().map(|m| m.subscribe()).collect()
    }
}

/// Generates one `#[tokio::test]` per conformance case, each over a fresh harness from `$factory`
/// (the name of an async fn in the calling module that returns a [`BackplaneHarness`]).
///
/// ```text
/// async fn harness() -> BackplaneHarness { /* connect three members, an outage */ }
/// tierstack_core::backplane_conformance_tests!(harness);
/// ```
#[macro_export]
macro_rules! backplane_conformance_tests {
    ($factory:ident) => {
        $crate::backplane_conformance_tests!(@cases $factory;
            a_message_reaches_every_other_member_and_not_its_sender,
            keys_prefixes_and_everything_arrive_intact,
            messages_from_one_sender_arrive_in_order,
            a_message_over_the_size_limit_is_refused_and_nothing_is_delivered,
            a_lost_subscription_is_reported_lost_then_resynced_and_hears_again,
            a_member_that_lost_its_subscription_still_reaches_the_others,
            a_dropped_subscription_does_not_stop_the_others,
        );
    };
    (@cases $factory:ident; $($case:ident),* $(,)?) => {
        mod backplane_conformance {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let harness = super::$factory().await;
                    $crate::testkit::backplane_conformance::$case(&harness).await;
                }
            )*
        }
    };
}

/// The next event of `subscription`, within [`WAIT`].
async fn next_event(subscription: &mut Subscription, what: &str) -> BackplaneEvent {
    match tokio::time::timeout(WAIT, subscription.recv()).await {
        Ok(Some(event)) => event,
        Ok(None) => panic!("{what}: the backplane shut down"),
        Err(tokio::time::error::Elapsed { .. }) => panic!("{what}: no event within {WAIT:?}"),
    }
}

/// The next event of `subscription`, which must be an invalidation.
async fn next_message(subscription: &mut Subscription, what: &str) -> InvalidationMessage {
    match next_event(subscription, what).await {
        BackplaneEvent::Invalidate(message) => Arc::unwrap_or_clone(message),
        other => panic!("{what}: expected an invalidation, got {other:?}"),
    }
}

fn message(namespace: &str, invalidation: Invalidation) -> InvalidationMessage {
    InvalidationMessage {
        namespace: namespace.to_owned(),
        invalidation,
    }
}

fn keys(keys: &[&str]) -> Invalidation {
    Invalidation::Keys(keys.iter().map(|&k| k.to_owned()).collect())
}

async fn publish(member: &dyn Backplane, sent: &InvalidationMessage) {
    tokio::time::timeout(WAIT, member.publish(&sent.namespace, &sent.invalidation))
        .await
        .unwrap_or_else(|_| panic!("publish of {sent:?} did not return within {WAIT:?}"))
        .unwrap_or_else(|e| panic!("publish of {sent:?} failed: {e} ({e:?})"));
}

/// A message reaches every other member, once, and never the member that published it.
///
/// Each member publishes in turn and every other member receives that message next; a member
/// that heard its own message would find it ahead of the next member's.
pub async fn a_message_reaches_every_other_member_and_not_its_sender(h: &BackplaneHarness) {
    let mut subscriptions = h.subscribe_all();
    let count = h.members.len();
    // The first member publishes again at the end: the last one's own message would show there.
    for (round, sender) in (0..count).chain([0]).enumerate() {
        let sent = message("users", keys(&[&format!("round-{round}-from-{sender}")]));
        publish(h.members[sender].as_ref(), &sent).await;
        for (receiver, subscription) in subscriptions.iter_mut().enumerate() {
            if receiver != sender {
                let what = format!("member {receiver}, round {round} from member {sender}");
                assert_eq!(next_message(subscription, &what).await, sent, "{what}");
            }
        }
    }
}

/// Key lists, prefixes and namespace-wide invalidations arrive as sent, with their namespace,
/// whatever characters they hold.
pub async fn keys_prefixes_and_everything_arrive_intact(h: &BackplaneHarness) {
    let sent = [
        message("users", keys(&["1"])),
        message(
            "ü/日本 \"quoted\" \\ back",
            keys(&["a:b", "ü/ñ", "a*b?[c]", "\"{}\"", "\u{0}nul", " "]),
        ),
        message("users", keys(&[])),
        message(
            "users",
            Invalidation::Prefix {
                prefix: "user:ü:*".to_owned(),
                at: Timestamp::from_millis(1_700_000_000_123),
            },
        ),
        message(
            "sessions",
            Invalidation::Prefix {
                prefix: String::new(),
                at: Timestamp::EPOCH,
            },
        ),
        message("users", Invalidation::All),
        message("", Invalidation::All),
    ];
    let mut subscriptions = h.subscribe_all();
    for one in &sent {
        publish(h.members[0].as_ref(), one).await;
    }
    for (receiver, subscription) in subscriptions.iter_mut().enumerate().skip(1) {
        for one in &sent {
            let what = format!("member {receiver}");
            assert_eq!(&next_message(subscription, &what).await, one, "{what}");
        }
    }
}

/// How many messages each sender publishes in
/// [`messages_from_one_sender_arrive_in_order`]: well under a subscription's queue.
const IN_ORDER: usize = 300;

/// The messages of one sender arrive in the order it published them, while another sender
/// publishes at the same time.
pub async fn messages_from_one_sender_arrive_in_order(h: &BackplaneHarness) {
    let mut subscriptions = h.subscribe_all();
    let senders = [0, 1];
    let publishing = senders.map(|sender| {
        let member = Arc::clone(&h.members[sender]);
        tokio::spawn(async move {
            for i in 0..IN_ORDER {
                let sent = message("orders", keys(&[&format!("{sender}:{i}")]));
                publish(member.as_ref(), &sent).await;
            }
        })
    });
    for task in publishing {
        task.await
            .unwrap_or_else(|e| panic!("a sender panicked: {e}"));
    }
    for (receiver, subscription) in subscriptions.iter_mut().enumerate() {
        let from: Vec<usize> = senders.into_iter().filter(|&s| s != receiver).collect();
        let mut next = vec![0; h.members.len()];
        for _ in 0..from.len() * IN_ORDER {
            let what = format!("member {receiver}, after {next:?} messages from each sender");
            let got = next_message(subscription, &what).await;
            let Invalidation::Keys(got_keys) = &got.invalidation else {
                panic!("{what}: {got:?}");
            };
            let (sender, index) = got_keys
                .first()
                .and_then(|key| key.split_once(':'))
                .and_then(|(s, i)| Some((s.parse::<usize>().ok()?, i.parse::<usize>().ok()?)))
                .unwrap_or_else(|| panic!("{what}: not a message of this case: {got:?}"));
            assert!(from.contains(&sender), "{what}: from member {sender}");
            assert_eq!(
                index, next[sender],
                "{what}: out of order from member {sender}"
            );
            next[sender] += 1;
        }
    }
}

/// A message of one key that encodes, on the wire, to exactly `wire_len` bytes.
fn message_of_wire_len(wire_len: usize) -> InvalidationMessage {
    let hub = BackplaneHub::new();
    let empty = hub
        .encode("big", &keys(&[""]))
        .unwrap_or_else(|e| panic!("encode: {e}"))
        .len();
    let sent = message("big", keys(&["x".repeat(wire_len - empty).as_str()]));
    let encoded = hub
        .encode(&sent.namespace, &sent.invalidation)
        .map(|wire| wire.len());
    assert!(
        matches!(encoded, Ok(len) if len == wire_len)
            || matches!(encoded, Err(CacheError::ValueTooLarge { size, .. }) if size == wire_len),
        "the test's own arithmetic: {encoded:?} for {wire_len}"
    );
    sent
}

/// A message of [`MAX_MESSAGE_LEN`] bytes on the wire is delivered whole; one byte more, or a
/// key list as large, is refused by `publish` with [`CacheError::ValueTooLarge`], and nothing of
/// it reaches anyone (the next message each member receives is the one published after it).
pub async fn a_message_over_the_size_limit_is_refused_and_nothing_is_delivered(
    h: &BackplaneHarness,
) {
    let mut subscriptions = h.subscribe_all();
    let largest = message_of_wire_len(MAX_MESSAGE_LEN);
    publish(h.members[0].as_ref(), &largest).await;
    for (receiver, subscription) in subscriptions.iter_mut().enumerate().skip(1) {
        let what = format!("member {receiver}, the largest message");
        let got = next_message(subscription, &what).await;
        // Not `assert_eq!`: a failure would print a megabyte.
        assert!(
            got == largest,
            "{what}: got namespace {:?} and {:?}",
            got.namespace,
            match &got.invalidation {
                Invalidation::Keys(keys) => format!(
                    "keys of {:?} bytes",
                    keys.iter().map(String::len).collect::<Vec<_>>()
                ),
                other => format!("{other:?}"),
            }
        );
    }

    let one_too_many = message_of_wire_len(MAX_MESSAGE_LEN + 1);
    let many_keys: Vec<String> = (0..MAX_MESSAGE_LEN / 8).map(|i| format!("k{i}")).collect();
    let refused = [
        (one_too_many, MAX_MESSAGE_LEN + 1),
        (message("big", Invalidation::Keys(many_keys)), 0),
    ];
    for (too_large, expected_size) in &refused {
        let result = tokio::time::timeout(
            WAIT,
            h.members[0].publish(&too_large.namespace, &too_large.invalidation),
        )
        .await
        .unwrap_or_else(|_| panic!("the refusal did not come within {WAIT:?}"));
        match result {
            Err(CacheError::ValueTooLarge { size, max }) => {
                assert_eq!(max, MAX_MESSAGE_LEN);
                assert!(size > MAX_MESSAGE_LEN, "{size}");
                if *expected_size > 0 {
                    assert_eq!(size, *expected_size);
                }
            }
            other => panic!("a message over the limit: expected ValueTooLarge, got {other:?}"),
        }
    }
    let marker = message("big", keys(&["after the refusals"]));
    publish(h.members[0].as_ref(), &marker).await;
    for (receiver, subscription) in subscriptions.iter_mut().enumerate().skip(1) {
        let what = format!("member {receiver}, after the refused messages");
        assert_eq!(next_message(subscription, &what).await, marker, "{what}");
    }
}

/// Waits, on the subscription of a member whose subscription was lost and is restored, for the
/// [`BackplaneEvent::Resync`]; a repeated [`BackplaneEvent::Lost`], or one of `missable` (sent
/// while it was lost: delivered late, it is still a message that was sent), may come first.
async fn until_resync(
    subscription: &mut Subscription,
    missable: &[&InvalidationMessage],
    what: &str,
) {
    loop {
        match next_event(subscription, what).await {
            BackplaneEvent::Resync => return,
            BackplaneEvent::Lost => {}
            BackplaneEvent::Invalidate(got) if missable.contains(&got.as_ref()) => {}
            other => panic!("{what}: expected a resync, got {other:?}"),
        }
    }
}

/// The next message of `subscription`, which must be `expected`; one of `missable` may come
/// first.
async fn until_message(
    subscription: &mut Subscription,
    expected: &InvalidationMessage,
    missable: &[&InvalidationMessage],
    what: &str,
) {
    loop {
        match next_event(subscription, what).await {
            BackplaneEvent::Invalidate(got) if *got == *expected => return,
            BackplaneEvent::Invalidate(got) if missable.contains(&got.as_ref()) => {}
            other => panic!("{what}: expected {expected:?}, got {other:?}"),
        }
    }
}

/// When every member's subscription is lost (a server restart), each subscriber receives
/// [`BackplaneEvent::Lost`] while it is lost and [`BackplaneEvent::Resync`] once it is back; a
/// publish meanwhile returns (whatever it answers), and a message published after the resync
/// is heard again.
pub async fn a_lost_subscription_is_reported_lost_then_resynced_and_hears_again(
    h: &BackplaneHarness,
) {
    let mut subscriptions = h.subscribe_all();
    for member in 0..h.members.len() {
        h.outage.lose(member).await;
    }
    for (receiver, subscription) in subscriptions.iter_mut().enumerate() {
        let what = format!("member {receiver}, once its subscription is lost");
        assert_eq!(
            next_event(subscription, &what).await,
            BackplaneEvent::Lost,
            "{what}"
        );
    }
    let during = message("users", keys(&["published while lost"]));
    // At most once: a message published now may be missed, but the publish must return.
    let _ = tokio::time::timeout(
        WAIT,
        h.members[0].publish(&during.namespace, &during.invalidation),
    )
    .await
    .unwrap_or_else(|_| panic!("a publish while lost did not return within {WAIT:?}"));

    for member in 0..h.members.len() {
        h.outage.restore(member).await;
    }
    for (receiver, subscription) in subscriptions.iter_mut().enumerate() {
        let what = format!("member {receiver}, once its subscription is back");
        until_resync(subscription, &[&during], &what).await;
    }
    let after = message("users", keys(&["published after the resync"]));
    publish(h.members[0].as_ref(), &after).await;
    for (receiver, subscription) in subscriptions.iter_mut().enumerate().skip(1) {
        let what = format!("member {receiver}, after the resync");
        until_message(subscription, &after, &[&during], &what).await;
    }
}

/// A member whose own subscription is lost is told so, while the others are not; what it
/// publishes meanwhile still reaches them (they would otherwise keep serving what it changed),
/// and once its subscription is back it is resynced and hears again.
pub async fn a_member_that_lost_its_subscription_still_reaches_the_others(h: &BackplaneHarness) {
    let mut subscriptions = h.subscribe_all();
    h.outage.lose(1).await;
    assert_eq!(
        next_event(
            &mut subscriptions[1],
            "member 1, once its subscription is lost"
        )
        .await,
        BackplaneEvent::Lost
    );
    let from_deaf = message("users", keys(&["from the member that cannot hear"]));
    publish(h.members[1].as_ref(), &from_deaf).await;
    for receiver in [0, 2] {
        let what = format!("member {receiver}, from the member that cannot hear");
        assert_eq!(
            next_message(&mut subscriptions[receiver], &what).await,
            from_deaf,
            "{what}"
        );
    }
    let to_deaf = message("users", keys(&["while member 1 cannot hear"]));
    publish(h.members[0].as_ref(), &to_deaf).await;
    assert_eq!(
        next_message(
            &mut subscriptions[2],
            "member 2, while member 1 cannot hear"
        )
        .await,
        to_deaf
    );

    h.outage.restore(1).await;
    until_resync(
        &mut subscriptions[1],
        &[&to_deaf],
        "member 1, once its subscription is back",
    )
    .await;
    let after = message("users", keys(&["heard again"]));
    publish(h.members[0].as_ref(), &after).await;
    until_message(
        &mut subscriptions[1],
        &after,
        &[&to_deaf],
        "member 1, after its resync",
    )
    .await;
    assert_eq!(
        next_message(&mut subscriptions[2], "member 2, after member 1's resync").await,
        after,
        "member 2 saw nothing of member 1's loss"
    );
}

/// Dropping one subscription leaves the member's other subscriptions, and the other members,
/// receiving; a subscription made afterwards receives too.
pub async fn a_dropped_subscription_does_not_stop_the_others(h: &BackplaneHarness) {
    let mut kept = h.members[1].subscribe();
    let dropped = h.members[1].subscribe();
    let mut other_member = h.members[2].subscribe();
    drop(dropped);
    let first = message("users", keys(&["after the drop"]));
    publish(h.members[0].as_ref(), &first).await;
    assert_eq!(
        next_message(&mut kept, "the kept subscription").await,
        first
    );
    assert_eq!(
        next_message(&mut other_member, "another member").await,
        first
    );

    let mut later = h.members[1].subscribe();
    drop(kept);
    let second = message("users", keys(&["after the second drop"]));
    publish(h.members[0].as_ref(), &second).await;
    assert_eq!(
        next_message(&mut later, "a subscription made after the drop").await,
        second
    );
    assert_eq!(
        next_message(&mut other_member, "another member, again").await,
        second
    );
}
