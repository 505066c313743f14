//! Routing: which vendor accounts carry a channel's messages, and in what order they are tried.
//!
//! A route names weighted accounts for one channel (and optionally one message type). Each
//! message's first account is drawn by weight from its own id, so a redelivered message goes
//! to the same account first; the others follow by descending weight, and are the failover
//! order. A weight of 0 makes a standby account: never first, only failed over to.

use crate::domain::{Channel, MsgType};
use serde::{Deserialize, Serialize};

/// Most routes in one policy document.
const MAX_ROUTES: usize = 50;
/// Most accounts in one route.
const MAX_ACCOUNTS: usize = 10;
/// Largest weight of one account.
const MAX_WEIGHT: u32 = 10_000;

/// One route of the policy document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    pub channel: Channel,
    /// Only messages of this type (default: every type).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub msg_type: Option<MsgType>,
    pub accounts: Vec<WeightedAccount>,
}

/// An account of a route and its share of first tries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeightedAccount {
    pub account_id: i64,
    pub weight: u32,
}

/// Checks the routes of a document; the error names the bad field.
pub fn check(routes: &[Route]) -> Result<(), String> {
    if routes.len() > MAX_ROUTES {
        return Err(format!("routes: at most {MAX_ROUTES} routes"));
    }
    for (i, route) in routes.iter().enumerate() {
        if route.channel == Channel::Inbox {
            return Err(format!(
                "routes[{i}].channel: the inbox has no vendor accounts"
            ));
        }
        if !(1..=MAX_ACCOUNTS).contains(&route.accounts.len()) {
            return Err(format!(
                "routes[{i}].accounts: between 1 and {MAX_ACCOUNTS} accounts"
            ));
        }
        for (j, a) in route.accounts.iter().enumerate() {
            if a.weight > MAX_WEIGHT {
                return Err(format!(
                    "routes[{i}].accounts[{j}].weight: {} is above {MAX_WEIGHT}",
                    a.weight
                ));
            }
            if route.accounts[..j]
                .iter()
                .any(|b| b.account_id == a.account_id)
            {
                return Err(format!(
                    "routes[{i}].accounts[{j}]: account {} is named twice",
                    a.account_id
                ));
            }
        }
        if route.accounts.iter().all(|a| a.weight == 0) {
            return Err(format!(
                "routes[{i}].accounts: every weight is 0, so no account would be tried first"
            ));
        }
    }
    Ok(())
}

/// The route for a message: the first that matches its channel and type.
pub fn route_for(routes: &[Route], channel: Channel, msg_type: MsgType) -> Option<&Route> {
    routes
        .iter()
        .find(|r| r.channel == channel && r.msg_type.is_none_or(|m| m == msg_type))
}

impl Route {
    /// The accounts in the order a message tries them: the first drawn by weight with `draw`
    /// (any number; a message uses bits of its id), then the rest by descending weight, ties in
    /// document order.
    pub fn order(&self, draw: u64) -> Vec<i64> {
        let total: u64 = self.accounts.iter().map(|a| u64::from(a.weight)).sum();
        let mut point = draw % total.max(1);
        let first = self
            .accounts
            .iter()
            .position(|a| {
                let w = u64::from(a.weight);
                if point < w {
                    true
                } else {
                    point -= w;
                    false
                }
            })
            .unwrap_or(0);
        let mut rest: Vec<&WeightedAccount> = self
            .accounts
            .iter()
            .enumerate()
            .filter(|&(k, _)| k != first)
            .map(|(_, a)| a)
            .collect();
        rest.sort_by_key(|a| std::cmp::Reverse(a.weight));
        std::iter::once(self.accounts[first].account_id)
            .chain(rest.into_iter().map(|a| a.account_id))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn route(weights: &[u32]) -> Route {
        Route {
            channel: Channel::Sms,
            msg_type: None,
            accounts: weights
                .iter()
                .enumerate()
                .map(|(k, &weight)| WeightedAccount {
                    account_id: k as i64 + 1,
                    weight,
                })
                .collect(),
        }
    }

    #[test]
    fn the_first_matching_route_wins() {
        let routes = vec![
            Route {
                msg_type: Some(MsgType::AuthCode),
                ..route(&[1])
            },
            route(&[0, 1]),
        ];
        let codes = route_for(&routes, Channel::Sms, MsgType::AuthCode).unwrap();
        assert_eq!(codes.order(0), vec![1]);
        let notices = route_for(&routes, Channel::Sms, MsgType::Notice).unwrap();
        assert_eq!(notices.order(0), vec![2, 1]);
        assert!(route_for(&routes, Channel::Email, MsgType::Notice).is_none());
    }

    #[test]
    fn bad_routes_name_the_field() {
        for (routes, field) in [
            (vec![route(&[])], "routes[0].accounts"),
            (vec![route(&[0, 0])], "routes[0].accounts"),
            (vec![route(&[1, 20_000])], "routes[0].accounts[1].weight"),
            (
                vec![Route {
                    channel: Channel::Inbox,
                    ..route(&[1])
                }],
                "routes[0].channel",
            ),
            (
                vec![Route {
                    accounts: vec![
                        WeightedAccount {
                            account_id: 7,
                            weight: 1,
                        };
                        2
                    ],
                    ..route(&[])
                }],
                "routes[0].accounts[1]",
            ),
        ] {
            let e = check(&routes).unwrap_err();
            assert!(e.starts_with(field), "{e}");
        }
        assert!(check(&[route(&[3, 0, 1])]).is_ok());
    }

    #[test]
    fn first_tries_follow_the_weights() {
        let r = route(&[70, 20, 10, 0]);
        let mut firsts = [0u32; 4];
        for draw in 0..10_000u64 {
            firsts[(r.order(draw.wrapping_mul(0x9E37_79B9_7F4A_7C15))[0] - 1) as usize] += 1;
        }
        assert_eq!(firsts[3], 0, "a standby account is never first");
        for (k, want) in [7_000, 2_000, 1_000].into_iter().enumerate() {
            let got = firsts[k] as i64;
            assert!(
                (got - want).abs() < 300,
                "account {}: {got} of 10000",
                k + 1
            );
        }
    }

    proptest! {
        #[test]
        fn every_account_is_tried_once_heaviest_first_after_the_draw(
            weights in proptest::collection::vec(0u32..100, 1..8),
            draw in any::<u64>(),
        ) {
            prop_assume!(weights.iter().any(|&w| w > 0));
            let r = route(&weights);
            let order = r.order(draw);
            let mut sorted = order.clone();
            sorted.sort_unstable();
            prop_assert_eq!(sorted, (1..=weights.len() as i64).collect::<Vec<_>>());
            prop_assert!(weights[(order[0] - 1) as usize] > 0);
            let rest: Vec<u32> = order[1..].iter().map(|&a| weights[(a - 1) as usize]).collect();
            prop_assert!(rest.windows(2).all(|w| w[0] >= w[1]));
        }
    }
}
