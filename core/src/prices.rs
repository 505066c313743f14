//! The price table (`[[prices]]` in the config): what herald expects to pay a vendor per billing
//! unit. Dispatch puts each `sent` event's cost on it ([`PriceTable::put_cost`]) and
//! `herald reconcile` prices bill rows with it, so both read one table with one rule order.
//!
//! For a message, the rules of its vendor are tried most specific first — a rule naming an
//! account before one that does not, then the longest country prefix, then a rule naming a message
//! type — and the first whose conditions all hold applies ([`PriceTable::rule`]). Among equally
//! specific rules the one written first in the config wins.

use crate::domain::MsgType;
use crate::wire::{DeliveryEvent, State};
use serde::Deserialize;

/// One price: `unit_price_micros` (millionths of `currency`) per billing unit of `vendor`, for
/// the messages that fit its optional conditions.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriceRule {
    /// The vendor as on `sent` events (`tencent`, `aliyun`, ...).
    pub vendor: String,
    /// Only messages sent through this account.
    pub account_id: Option<i64>,
    /// Only receivers starting with this (`+86`, `+852`): `+` and digits.
    pub country_prefix: Option<String>,
    /// Only this message type (`notice`, `marketing`, `auth_code`).
    pub msg_type: Option<MsgType>,
    /// Millionths of `currency` per billing unit (0.045 CNY is 45000); not negative.
    pub unit_price_micros: i64,
    /// ISO 4217 code, e.g. `CNY`; one currency per vendor.
    pub currency: String,
}

impl PriceRule {
    /// Orders rules: greater is more specific.
    fn specificity(&self) -> (bool, usize, bool) {
        (
            self.account_id.is_some(),
            self.country_prefix.as_ref().map_or(0, String::len),
            self.msg_type.is_some(),
        )
    }

    /// Whether the rule's conditions (not its vendor) hold for a message.
    fn fits(&self, account_id: Option<i64>, receiver: &str, msg_type: MsgType) -> bool {
        self.account_id.is_none_or(|a| account_id == Some(a))
            && self
                .country_prefix
                .as_deref()
                .is_none_or(|p| receiver.starts_with(p))
            && self.msg_type.is_none_or(|t| t == msg_type)
    }
}

/// Why a price table was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PriceError {
    #[error("prices: country_prefix `{0}` is not `+` and digits")]
    BadPrefix(String),
    #[error("prices: currency `{0}` is not an ISO 4217 code such as CNY")]
    BadCurrency(String),
    #[error("prices: unit_price_micros {0} is negative")]
    NegativePrice(i64),
    #[error("prices: {vendor} has prices in {first} and {second}; one currency per vendor")]
    MixedCurrency {
        vendor: String,
        first: String,
        second: String,
    },
}

/// Checked price rules, most specific first.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(try_from = "Vec<PriceRule>")]
pub struct PriceTable {
    rules: Vec<PriceRule>,
}

impl TryFrom<Vec<PriceRule>> for PriceTable {
    type Error = PriceError;

    fn try_from(rules: Vec<PriceRule>) -> Result<Self, Self::Error> {
        PriceTable::new(rules)
    }
}

impl PriceTable {
    /// Checks `rules` (prefixes `+digits`, three-letter currencies, one currency per vendor,
    /// prices not negative) and orders them most specific first.
    pub fn new(mut rules: Vec<PriceRule>) -> Result<PriceTable, PriceError> {
        for (i, r) in rules.iter().enumerate() {
            if let Some(p) = &r.country_prefix {
                let digits = p.strip_prefix('+').unwrap_or("");
                if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(PriceError::BadPrefix(p.clone()));
                }
            }
            if r.currency.len() != 3 || !r.currency.bytes().all(|b| b.is_ascii_uppercase()) {
                return Err(PriceError::BadCurrency(r.currency.clone()));
            }
            if r.unit_price_micros < 0 {
                return Err(PriceError::NegativePrice(r.unit_price_micros));
            }
            if let Some(first) = rules[..i]
                .iter()
                .find(|f| f.vendor == r.vendor && f.currency != r.currency)
            {
                return Err(PriceError::MixedCurrency {
                    vendor: r.vendor.clone(),
                    first: first.currency.clone(),
                    second: r.currency.clone(),
                });
            }
        }
        // Stable: among equally specific rules the first in the config stays first.
        rules.sort_by_key(|r| std::cmp::Reverse(r.specificity()));
        Ok(PriceTable { rules })
    }

    /// The rules of `vendor` in the order [`rule`](Self::rule) tries them.
    pub fn of_vendor<'a>(&'a self, vendor: &'a str) -> impl Iterator<Item = &'a PriceRule> {
        self.rules.iter().filter(move |r| r.vendor == vendor)
    }

    /// The rule that prices a message of `msg_type` to `receiver` sent through `vendor` and
    /// `account_id`: the most specific that fits (module docs); `None` when none does.
    pub fn rule(
        &self,
        vendor: &str,
        account_id: Option<i64>,
        receiver: &str,
        msg_type: MsgType,
    ) -> Option<&PriceRule> {
        self.rules
            .iter()
            .find(|r| r.vendor == vendor && r.fits(account_id, receiver, msg_type))
    }

    /// Puts `cost_micros` (billing units × unit price; one unit where the vendor bills per
    /// message and the event has no units) and `currency` on a `sent` event with a vendor.
    /// Other events, and events no rule prices, are left as they are (both fields null).
    pub fn put_cost(&self, e: &mut DeliveryEvent) {
        if e.state != State::Sent {
            return;
        }
        let Some(vendor) = e.vendor.as_deref() else {
            return;
        };
        let Some(rule) = self.rule(vendor, e.account_id, &e.receiver, e.msg_type) else {
            return;
        };
        let units = i64::from(e.billing_units.unwrap_or(1));
        if let Some(cost) = rule.unit_price_micros.checked_mul(units) {
            e.cost_micros = Some(cost);
            e.currency = Some(rule.currency.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Channel;
    use crate::wire::MessageRecord;

    fn rule(
        account: Option<i64>,
        prefix: Option<&str>,
        msg_type: Option<MsgType>,
        micros: i64,
    ) -> PriceRule {
        PriceRule {
            vendor: "tencent".into(),
            account_id: account,
            country_prefix: prefix.map(str::to_string),
            msg_type,
            unit_price_micros: micros,
            currency: "CNY".into(),
        }
    }

    /// The unit price for a message, or 0 where no rule fits.
    fn price(t: &PriceTable, vendor: &str, account: Option<i64>, to: &str, m: MsgType) -> i64 {
        t.rule(vendor, account, to, m)
            .map_or(0, |r| r.unit_price_micros)
    }

    #[test]
    fn the_most_specific_fitting_rule_prices_a_message() {
        let table = PriceTable::new(vec![
            rule(None, None, None, 1),
            rule(None, Some("+86"), Some(MsgType::Marketing), 2),
            rule(None, Some("+852"), None, 3),
            rule(Some(7), None, None, 4),
            rule(None, Some("+8613"), None, 5),
            rule(None, None, Some(MsgType::AuthCode), 6),
            PriceRule {
                vendor: "aliyun".into(),
                ..rule(Some(8), None, None, 7)
            },
        ])
        .unwrap();
        let n = MsgType::Notice;
        // The account beats every prefix and type.
        assert_eq!(price(&table, "tencent", Some(7), "+8613800000000", n), 4);
        // The longest prefix that fits, whatever the message type.
        assert_eq!(
            price(
                &table,
                "tencent",
                None,
                "+8613800000000",
                MsgType::Marketing
            ),
            5
        );
        assert_eq!(
            price(
                &table,
                "tencent",
                None,
                "+8615800000000",
                MsgType::Marketing
            ),
            2
        );
        assert_eq!(price(&table, "tencent", None, "+85291234567", n), 3);
        // A prefix beats a message type; a rule's conditions must all hold.
        assert_eq!(
            price(&table, "tencent", None, "+8615800000000", MsgType::AuthCode),
            6
        );
        assert_eq!(price(&table, "tencent", None, "+8615800000000", n), 1);
        assert_eq!(price(&table, "tencent", None, "+14155550123", n), 1);
        // Another vendor's rules never apply; no rule, no price.
        assert_eq!(price(&table, "aliyun", Some(7), "+8613800000000", n), 0);
        assert_eq!(price(&table, "aliyun", Some(8), "+8613800000000", n), 7);
        assert_eq!(price(&table, "yunpian", None, "+8613800000000", n), 0);
        let order: Vec<i64> = table
            .of_vendor("tencent")
            .map(|r| r.unit_price_micros)
            .collect();
        assert_eq!(order, [4, 5, 3, 2, 6, 1]);
    }

    #[test]
    fn among_equally_specific_rules_the_first_written_wins() {
        let table = PriceTable::new(vec![
            rule(None, None, None, 1),
            rule(None, Some("+86"), None, 2),
            rule(None, None, None, 3),
            rule(None, Some("+44"), Some(MsgType::Notice), 4),
            rule(None, Some("+86"), None, 5),
            rule(None, Some("+14"), Some(MsgType::Notice), 6),
        ])
        .unwrap();
        let n = MsgType::Notice;
        assert_eq!(price(&table, "tencent", None, "+8613800000000", n), 2);
        assert_eq!(price(&table, "tencent", None, "+33612345678", n), 1);
        // Same prefix length and a type: the first written.
        assert_eq!(price(&table, "tencent", None, "+14155550123", n), 6);
        assert_eq!(price(&table, "tencent", None, "+447700900123", n), 4);
    }

    #[test]
    fn bad_tables_are_refused() {
        let err = |rules| PriceTable::new(rules).unwrap_err();
        for bad in ["86", "+", "+86'", "+8 6"] {
            assert_eq!(
                err(vec![rule(None, Some(bad), None, 1)]),
                PriceError::BadPrefix(bad.into())
            );
        }
        let yuan = |c: &str| PriceRule {
            currency: c.into(),
            ..rule(None, None, None, 1)
        };
        assert_eq!(
            err(vec![yuan("cny")]),
            PriceError::BadCurrency("cny".into())
        );
        assert_eq!(
            err(vec![rule(None, None, None, -1)]),
            PriceError::NegativePrice(-1)
        );
        assert!(matches!(
            err(vec![yuan("CNY"), yuan("USD")]),
            PriceError::MixedCurrency { .. }
        ));
        let usd_elsewhere = PriceRule {
            vendor: "twilio".into(),
            ..yuan("USD")
        };
        assert!(PriceTable::new(vec![yuan("CNY"), usd_elsewhere]).is_ok());
    }

    #[test]
    fn a_table_reads_from_toml_with_message_types_checked() {
        #[derive(Deserialize)]
        struct Doc {
            prices: PriceTable,
        }
        let doc: Doc = toml::from_str(
            "[[prices]]\nvendor = \"tencent\"\nunit_price_micros = 45000\ncurrency = \"CNY\"\n\
             [[prices]]\nvendor = \"tencent\"\nmsg_type = \"marketing\"\n\
             unit_price_micros = 50000\ncurrency = \"CNY\"\n",
        )
        .unwrap();
        assert_eq!(doc.prices.of_vendor("tencent").count(), 2);
        let bad = toml::from_str::<Doc>(
            "[[prices]]\nvendor = \"t\"\nmsg_type = \"promo\"\nunit_price_micros = 1\n\
             currency = \"CNY\"\n",
        );
        assert!(bad.is_err());
        let bad = toml::from_str::<Doc>(
            "[[prices]]\nvendor = \"t\"\ncountry_prefix = \"86\"\nunit_price_micros = 1\n\
             currency = \"CNY\"\n",
        )
        .err()
        .unwrap()
        .to_string();
        assert!(bad.contains("country_prefix `86`"), "{bad}");
    }

    fn sent(units: Option<u32>) -> DeliveryEvent {
        let record = MessageRecord {
            v: 1,
            message_id: crate::domain::MessageId::new(),
            request_id: "r".into(),
            biz_id: None,
            app: "shop".into(),
            template_id: 1,
            channel: Channel::Sms,
            msg_type: MsgType::Notice,
            account_id: Some(7),
            receiver: "+8613800000000".into(),
            content: serde_json::json!({}),
            accepted_at: chrono::Utc::now(),
            send_at: None,
            timezone: None,
        };
        let mut e = DeliveryEvent::for_record(&record, State::Sent, 1);
        e.vendor = Some("tencent".into());
        e.billing_units = units;
        e
    }

    #[test]
    fn sent_events_cost_their_units_times_the_price() {
        let table = PriceTable::new(vec![rule(None, Some("+86"), None, 45_000)]).unwrap();
        let mut e = sent(Some(3));
        table.put_cost(&mut e);
        assert_eq!(
            (e.cost_micros, e.currency.as_deref()),
            (Some(135_000), Some("CNY"))
        );
        // Billed per message: one unit.
        let mut e = sent(None);
        table.put_cost(&mut e);
        assert_eq!(e.cost_micros, Some(45_000));
        // No rule, no vendor, or not `sent`: no cost.
        let mut e = sent(Some(1));
        e.receiver = "+14155550123".into();
        table.put_cost(&mut e);
        assert_eq!((e.cost_micros, e.currency), (None, None));
        let mut e = sent(Some(1));
        e.vendor = None;
        table.put_cost(&mut e);
        assert_eq!(e.cost_micros, None);
        let mut e = sent(Some(1));
        e.state = State::SendFailed;
        table.put_cost(&mut e);
        assert_eq!(e.cost_micros, None);
    }
}
