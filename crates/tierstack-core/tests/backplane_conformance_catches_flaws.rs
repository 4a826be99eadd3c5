//! Each case of the backplane conformance suite fails on a backplane with the flaw it guards
//! against, and passes on the same backplane without it: no case asserts on nothing.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use tierstack_core::backplane::{BackplaneHub, InvalidationMessage};
use tierstack_core::testkit::backplane_conformance::{
    self as suite, BackplaneHarness, SubscriptionOutage,
};
use tierstack_core::{Backplane, Invalidation, Result, Subscription};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flaw {
    None,
    /// Delivers a member's messages to itself too.
    HearsItself,
    /// Turns a prefix into the whole namespace.
    PrefixAsAll,
    /// Swaps each pair of messages.
    Reorders,
    /// Sends messages of any size.
    NoSizeLimit,
    /// Goes deaf without telling anyone.
    NeverReportsLost,
    /// Reports a resync but stays deaf.
    DeafAfterResync,
    /// A member that cannot hear cannot publish either.
    MuteWhileDeaf,
    /// A new subscription ends the member's earlier ones.
    SubscribeEndsOthers,
}

/// A bus whose members share their hubs directly (no wire), with one flaw.
#[derive(Debug)]
struct Bus {
    flaw: Flaw,
    hubs: Mutex<Vec<BackplaneHub>>,
    deaf: Vec<AtomicBool>,
}

#[derive(Debug)]
struct Member {
    bus: Arc<Bus>,
    index: usize,
    /// The message that [`Flaw::Reorders`] holds back until this member's next.
    held: Mutex<Option<InvalidationMessage>>,
}

#[async_trait]
impl Backplane for Member {
    async fn publish(&self, namespace: &str, invalidation: &Invalidation) -> Result<()> {
        let bus = &self.bus;
        let invalidation = match invalidation {
            Invalidation::Prefix { .. } if bus.flaw == Flaw::PrefixAsAll => Invalidation::All,
            other => other.clone(),
        };
        let hub = bus.hubs.lock().unwrap()[self.index].clone();
        if bus.flaw != Flaw::NoSizeLimit {
            hub.encode(namespace, &invalidation)?;
        }
        if bus.flaw == Flaw::MuteWhileDeaf && bus.deaf[self.index].load(Ordering::SeqCst) {
            return Ok(());
        }
        let message = InvalidationMessage {
            namespace: namespace.to_owned(),
            invalidation,
        };
        let mut batch = vec![message];
        if bus.flaw == Flaw::Reorders {
            let mut held = self.held.lock().unwrap();
            match held.take() {
                Some(earlier) => batch.push(earlier),
                None => {
                    *held = batch.pop();
                }
            }
        }
        for message in batch {
            for (index, hub) in bus.hubs.lock().unwrap().iter().enumerate() {
                let hears = !bus.deaf[index].load(Ordering::SeqCst);
                if hears && (index != self.index || bus.flaw == Flaw::HearsItself) {
                    hub.deliver(message.clone());
                }
            }
        }
        Ok(())
    }

    fn subscribe(&self) -> Subscription {
        let mut hubs = self.bus.hubs.lock().unwrap();
        if self.bus.flaw == Flaw::SubscribeEndsOthers {
            hubs[self.index] = BackplaneHub::new();
        }
        hubs[self.index].subscribe()
    }
}

#[derive(Debug)]
struct Outage(Arc<Bus>);

#[async_trait]
impl SubscriptionOutage for Outage {
    async fn lose(&self, member: usize) {
        self.0.deaf[member].store(true, Ordering::SeqCst);
        if self.0.flaw != Flaw::NeverReportsLost {
            self.0.hubs.lock().unwrap()[member].lost();
        }
    }

    async fn restore(&self, member: usize) {
        if self.0.flaw != Flaw::DeafAfterResync {
            self.0.deaf[member].store(false, Ordering::SeqCst);
        }
        self.0.hubs.lock().unwrap()[member].resync();
    }
}

fn harness(flaw: Flaw) -> BackplaneHarness {
    let bus = Arc::new(Bus {
        flaw,
        hubs: Mutex::new((0..3).map(|_| BackplaneHub::new()).collect()),
        deaf: (0..3).map(|_| AtomicBool::new(false)).collect(),
    });
    let members = (0..3)
        .map(|index| {
            Arc::new(Member {
                bus: Arc::clone(&bus),
                index,
                held: Mutex::new(None),
            }) as Arc<dyn Backplane>
        })
        .collect();
    BackplaneHarness::new(members, Outage(bus))
}

/// Runs `$case` over a harness with `$flaw`; whether it passed.
macro_rules! passes {
    ($case:ident, $flaw:expr) => {{
        let harness = harness($flaw);
        tokio::spawn(async move { suite::$case(&harness).await })
            .await
            .map_err(|e| assert!(e.is_panic(), "{e}"))
            .is_ok()
    }};
}

/// Each case passes without the flaw and fails with it. Paused time: a case that waits in vain
/// fails at once, when its bounded wait runs out.
macro_rules! catches {
    ($($case:ident: $($flaw:expr),+;)*) => {
        $(
            #[tokio::test(start_paused = true)]
            async fn $case() {
                assert!(passes!($case, Flaw::None), "without a flaw");
                $(assert!(!passes!($case, $flaw), "{:?} went unnoticed", $flaw);)+
            }
        )*
    };
}

catches! {
    a_message_reaches_every_other_member_and_not_its_sender: Flaw::HearsItself;
    keys_prefixes_and_everything_arrive_intact: Flaw::PrefixAsAll, Flaw::Reorders;
    messages_from_one_sender_arrive_in_order: Flaw::Reorders, Flaw::HearsItself;
    a_message_over_the_size_limit_is_refused_and_nothing_is_delivered: Flaw::NoSizeLimit;
    a_lost_subscription_is_reported_lost_then_resynced_and_hears_again:
        Flaw::NeverReportsLost, Flaw::DeafAfterResync;
    a_member_that_lost_its_subscription_still_reaches_the_others:
        Flaw::MuteWhileDeaf, Flaw::NeverReportsLost, Flaw::DeafAfterResync;
    a_dropped_subscription_does_not_stop_the_others: Flaw::SubscribeEndsOthers;
}
