#!/bin/sh
# azd postdeploy hook: create (or update) the Event Grid subscriptions in infra/eventgrid.bicep.
# They must come after the code: Event Grid validates each endpoint when the subscription is made,
# and the blob extension's system key exists only once the host has run the Event Grid blob trigger.
# azd passes its environment (main.bicep's outputs) to hooks; outside azd, `azd env get-values` is read.
set -eu

if [ -z "${AZURE_FUNCTION_APP_NAME:-}" ] && command -v azd >/dev/null 2>&1; then
    eval "$(azd env get-values)"
fi
: "${AZURE_RESOURCE_GROUP:?run azd provision first}"
: "${AZURE_FUNCTION_APP_NAME:?run azd provision first}"

# Wake the host so that it creates the blobs_extension system key, then wait for the key.
echo "Waiting for the blob extension key of ${AZURE_FUNCTION_APP_NAME}..."
tries=0
while :; do
    curl -s -o /dev/null --max-time 30 "https://${AZURE_FUNCTION_APP_NAME}.azurewebsites.net/" || true
    key=$(az functionapp keys list -g "$AZURE_RESOURCE_GROUP" -n "$AZURE_FUNCTION_APP_NAME" \
        --query "systemKeys.blobs_extension" -o tsv 2>/dev/null || true)
    [ -n "$key" ] && break
    tries=$((tries + 1))
    if [ "$tries" -ge 30 ]; then
        echo "No blobs_extension key after 5 minutes: is the app deployed and starting? (azd deploy, then azd hooks run postdeploy)" >&2
        exit 1
    fi
    sleep 10
done
unset key

az deployment group create \
    --name tunedrop-eventgrid \
    --resource-group "$AZURE_RESOURCE_GROUP" \
    --template-file infra/eventgrid.bicep \
    --parameters \
        functionAppName="$AZURE_FUNCTION_APP_NAME" \
        storageSystemTopicName="$AZURE_STORAGE_SYSTEM_TOPIC_NAME" \
        storageAccountName="$AZURE_STORAGE_ACCOUNT_NAME" \
        deadLetterContainer="$AZURE_EVENTGRID_DEADLETTER_CONTAINER" \
        trainingContainer="$TUNEDROP_TRAINING_CONTAINER" \
        workspaceResourceGroup="$AZURE_ML_RESOURCE_GROUP" \
        workspaceSystemTopicName="$AZURE_ML_SYSTEM_TOPIC_NAME" \
    --output none
echo "Event Grid subscriptions are in place: blob created -> ingest, Azure ML run events -> job_events."
