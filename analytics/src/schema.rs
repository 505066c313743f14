//! The `delivery_events` table: its Arrow schema and the conversions between
//! [`DeliveryEvent`]s and record batches.

use crate::error::AnalyticsError;
use crate::privacy::ReceiverPrivacy;
use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, Int64Array, Int64Builder, RecordBatch, StringArray, StringBuilder,
    TimestampMicrosecondArray, TimestampMicrosecondBuilder,
};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{
    DataType, Field, Int64Type, Schema, SchemaRef, TimeUnit, TimestampMicrosecondType,
};
use herald_core::{Channel, DeliveryEvent, MessageId, MsgType, State};
use std::sync::{Arc, LazyLock};

/// Name of the table (and of its directory under the warehouse root).
pub const TABLE: &str = "delivery_events";

/// The timezone of the `ts` column.
const UTC: &str = "UTC";

static SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    let utf8 = |name: &str, nullable: bool| Field::new(name, DataType::Utf8, nullable);
    let int64 = |name: &str, nullable: bool| Field::new(name, DataType::Int64, nullable);
    Arc::new(Schema::new(vec![
        utf8("event_id", false),
        Field::new(
            "ts",
            DataType::Timestamp(TimeUnit::Microsecond, Some(UTC.into())),
            false,
        ),
        utf8("message_id", false),
        utf8("request_id", false),
        utf8("biz_id", true),
        utf8("app", false),
        int64("template_id", false),
        utf8("channel", false),
        utf8("msg_type", false),
        utf8("receiver", false),
        utf8("state", false),
        utf8("vendor", true),
        int64("account_id", true),
        utf8("vendor_message_id", true),
        int64("attempt", false),
        utf8("error_code", true),
        utf8("error_detail", true),
        int64("latency_ms", true),
        int64("billing_units", true),
        int64("cost_micros", true),
        utf8("currency", true),
    ]))
});

/// The Arrow schema of the rows in `delivery_events` Parquet files (the `dt` and `hour`
/// partition columns live in the directory names, not in the files). Unsigned fields of
/// [`DeliveryEvent`] are widened to `Int64` so that every Parquet reader handles them.
pub fn schema() -> SchemaRef {
    SCHEMA.clone()
}

/// Converts events to one record batch of [`schema()`]. `redelivered` is not stored.
pub fn events_to_batch(events: &[DeliveryEvent]) -> RecordBatch {
    events_to_batch_with(events, &ReceiverPrivacy::Clear)
}

/// [`events_to_batch`] with each receiver written as `receivers` says.
pub fn events_to_batch_with(events: &[DeliveryEvent], receivers: &ReceiverPrivacy) -> RecordBatch {
    let n = events.len();
    let strings = |bytes_each: usize| StringBuilder::with_capacity(n, n * bytes_each);
    let mut event_id = strings(36);
    let mut ts = TimestampMicrosecondBuilder::with_capacity(n).with_timezone(UTC);
    let mut message_id = strings(36);
    let mut request_id = strings(36);
    let mut biz_id = strings(16);
    let mut app = strings(16);
    let mut template_id = Int64Builder::with_capacity(n);
    let mut channel = strings(8);
    let mut msg_type = strings(8);
    let mut receiver = strings(24);
    let mut state = strings(8);
    let mut vendor = strings(8);
    let mut account_id = Int64Builder::with_capacity(n);
    let mut vendor_message_id = strings(16);
    let mut attempt = Int64Builder::with_capacity(n);
    let mut error_code = strings(0);
    let mut error_detail = strings(0);
    let mut latency_ms = Int64Builder::with_capacity(n);
    let mut billing_units = Int64Builder::with_capacity(n);
    let mut cost_micros = Int64Builder::with_capacity(n);
    let mut currency = strings(0);
    let mut uuid_buf = uuid::Uuid::encode_buffer();
    for e in events {
        event_id.append_value(&e.event_id);
        ts.append_value(e.ts.timestamp_micros());
        message_id.append_value(e.message_id.0.hyphenated().encode_lower(&mut uuid_buf));
        request_id.append_value(&e.request_id);
        biz_id.append_option(e.biz_id.as_deref());
        app.append_value(&e.app);
        template_id.append_value(e.template_id);
        channel.append_value(e.channel.as_str());
        msg_type.append_value(e.msg_type.as_str());
        receiver.append_value(receivers.apply(&e.receiver));
        state.append_value(e.state.as_str());
        vendor.append_option(e.vendor.as_deref());
        account_id.append_option(e.account_id);
        vendor_message_id.append_option(e.vendor_message_id.as_deref());
        attempt.append_value(i64::from(e.attempt));
        error_code.append_option(e.error_code.as_deref());
        error_detail.append_option(e.error_detail.as_deref());
        // Saturates only past i64::MAX milliseconds (292 million years).
        latency_ms.append_option(e.latency_ms.map(|l| i64::try_from(l).unwrap_or(i64::MAX)));
        billing_units.append_option(e.billing_units.map(i64::from));
        cost_micros.append_option(e.cost_micros);
        currency.append_option(e.currency.as_deref());
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(event_id.finish()),
        Arc::new(ts.finish()),
        Arc::new(message_id.finish()),
        Arc::new(request_id.finish()),
        Arc::new(biz_id.finish()),
        Arc::new(app.finish()),
        Arc::new(template_id.finish()),
        Arc::new(channel.finish()),
        Arc::new(msg_type.finish()),
        Arc::new(receiver.finish()),
        Arc::new(state.finish()),
        Arc::new(vendor.finish()),
        Arc::new(account_id.finish()),
        Arc::new(vendor_message_id.finish()),
        Arc::new(attempt.finish()),
        Arc::new(error_code.finish()),
        Arc::new(error_detail.finish()),
        Arc::new(latency_ms.finish()),
        Arc::new(billing_units.finish()),
        Arc::new(cost_micros.finish()),
        Arc::new(currency.finish()),
    ];
    // The columns are built above in schema order with the schema's types and equal lengths.
    RecordBatch::try_new(schema(), columns).expect("columns match schema()")
}

/// Converts a batch holding (at least) the columns of [`schema()`] back into events, with
/// `redelivered` false. Extra columns (such as the partition columns) are ignored.
pub(crate) fn batch_to_events(batch: &RecordBatch) -> Result<Vec<DeliveryEvent>, AnalyticsError> {
    let c = Columns { batch };
    let event_id = c.utf8("event_id")?;
    let ts = c.ts("ts")?;
    let message_id = c.utf8("message_id")?;
    let request_id = c.utf8("request_id")?;
    let biz_id = c.utf8("biz_id")?;
    let app = c.utf8("app")?;
    let template_id = c.int64("template_id")?;
    let channel = c.utf8("channel")?;
    let msg_type = c.utf8("msg_type")?;
    let receiver = c.utf8("receiver")?;
    let state = c.utf8("state")?;
    let vendor = c.utf8("vendor")?;
    let account_id = c.int64("account_id")?;
    let vendor_message_id = c.utf8("vendor_message_id")?;
    let attempt = c.int64("attempt")?;
    let error_code = c.utf8("error_code")?;
    let error_detail = c.utf8("error_detail")?;
    let latency_ms = c.int64("latency_ms")?;
    let billing_units = c.int64("billing_units")?;
    let cost_micros = c.int64("cost_micros")?;
    let currency = c.utf8("currency")?;

    let string = |a: &StringArray, i: usize| opt_str(a, i).map(str::to_string);
    let int = |a: &Int64Array, i: usize| (!a.is_null(i)).then(|| a.value(i));
    let mut out = Vec::with_capacity(batch.num_rows());
    for i in 0..batch.num_rows() {
        let micros = ts.value(i);
        out.push(DeliveryEvent {
            event_id: event_id.value(i).to_string(),
            ts: chrono::DateTime::from_timestamp_micros(micros)
                .ok_or_else(|| corrupt("ts", micros))?,
            message_id: message_id
                .value(i)
                .parse::<MessageId>()
                .map_err(|_| corrupt("message_id", message_id.value(i)))?,
            request_id: request_id.value(i).to_string(),
            biz_id: string(&biz_id, i),
            app: app.value(i).to_string(),
            template_id: template_id.value(i),
            channel: channel
                .value(i)
                .parse::<Channel>()
                .map_err(|_| corrupt("channel", channel.value(i)))?,
            msg_type: msg_type
                .value(i)
                .parse::<MsgType>()
                .map_err(|_| corrupt("msg_type", msg_type.value(i)))?,
            receiver: receiver.value(i).to_string(),
            state: State::ALL
                .into_iter()
                .find(|s| s.as_str() == state.value(i))
                .ok_or_else(|| corrupt("state", state.value(i)))?,
            vendor: string(&vendor, i),
            account_id: int(account_id, i),
            vendor_message_id: string(&vendor_message_id, i),
            attempt: u32::try_from(attempt.value(i))
                .map_err(|_| corrupt("attempt", attempt.value(i)))?,
            error_code: string(&error_code, i),
            error_detail: string(&error_detail, i),
            latency_ms: int(latency_ms, i)
                .map(|v| u64::try_from(v).map_err(|_| corrupt("latency_ms", v)))
                .transpose()?,
            billing_units: int(billing_units, i)
                .map(|v| u32::try_from(v).map_err(|_| corrupt("billing_units", v)))
                .transpose()?,
            cost_micros: int(cost_micros, i),
            currency: string(&currency, i),
            redelivered: false,
        });
    }
    Ok(out)
}

fn opt_str(a: &StringArray, i: usize) -> Option<&str> {
    (!a.is_null(i)).then(|| a.value(i))
}

fn corrupt(column: &str, value: impl std::fmt::Display) -> AnalyticsError {
    AnalyticsError::Corrupt(format!("bad {column} value `{value}`"))
}

/// Typed access to a batch's columns by name.
struct Columns<'a> {
    batch: &'a RecordBatch,
}

impl<'a> Columns<'a> {
    fn column(&self, name: &str, want: &DataType) -> Result<&'a ArrayRef, AnalyticsError> {
        let col = self
            .batch
            .column_by_name(name)
            .ok_or_else(|| AnalyticsError::Corrupt(format!("column {name} is missing")))?;
        let matches = match (col.data_type(), want) {
            (DataType::Timestamp(u, _), DataType::Timestamp(w, _)) => u == w,
            (have, want) => have == want,
        };
        if matches {
            Ok(col)
        } else {
            Err(AnalyticsError::Corrupt(format!(
                "column {name} is {}, expected {want}",
                col.data_type()
            )))
        }
    }

    /// A string column, plain (`Utf8`, as herald writes it) or a view (`Utf8View`, as queries
    /// read it), as plain strings.
    fn utf8(&self, name: &str) -> Result<StringArray, AnalyticsError> {
        let col = match self.batch.column_by_name(name) {
            Some(col) if *col.data_type() == DataType::Utf8View => &cast(col, &DataType::Utf8)?,
            _ => self.column(name, &DataType::Utf8)?,
        };
        Ok(col.as_string::<i32>().clone())
    }

    fn int64(&self, name: &str) -> Result<&'a Int64Array, AnalyticsError> {
        Ok(self
            .column(name, &DataType::Int64)?
            .as_primitive::<Int64Type>())
    }

    fn ts(&self, name: &str) -> Result<&'a TimestampMicrosecondArray, AnalyticsError> {
        let want = DataType::Timestamp(TimeUnit::Microsecond, None);
        Ok(self
            .column(name, &want)?
            .as_primitive::<TimestampMicrosecondType>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::sample_events;

    #[test]
    fn events_survive_a_round_trip_through_a_batch() {
        let events = sample_events(50, 0);
        let batch = events_to_batch(&events);
        assert_eq!(batch.schema(), schema());
        assert_eq!(batch.num_rows(), 50);
        assert_eq!(batch_to_events(&batch).unwrap(), events);
    }

    #[test]
    fn the_schema_has_the_documented_columns_and_no_redelivered_flag() {
        let names: Vec<_> = schema().fields().iter().map(|f| f.name().clone()).collect();
        assert_eq!(
            names.join(","),
            "event_id,ts,message_id,request_id,biz_id,app,template_id,channel,msg_type,receiver,\
             state,vendor,account_id,vendor_message_id,attempt,error_code,error_detail,latency_ms,\
             billing_units,cost_micros,currency"
        );
    }
}
